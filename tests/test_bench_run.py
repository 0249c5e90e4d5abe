"""benchmarks/{run,report}.py helpers on synthetic rows: Pareto front, tables, plot, slugs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import benchmarks.run as run
from benchmarks.report import pareto_front, plot_setting, render_markdown
from benchmarks.run import Build, Setting, _fusion_status, error_line, machine_slug


def test_pareto_front_keeps_only_undominated_points_in_latency_order():
    points = [(1.0, 80.0), (0.5, 79.0), (0.6, 78.0), (0.4, 70.0), (1.1, 81.0), (0.5, 75.0)]
    assert pareto_front(points) == [3, 1, 0, 4]


def test_pareto_front_of_equal_points_keeps_the_first():
    assert pareto_front([(0.5, 70.0), (0.5, 70.0)]) == [0]
    assert pareto_front([]) == []


def test_a_latency_target_is_timed_only_in_the_setting_it_was_compiled_for():
    target = Build("m/t50", "m", "planer 50% latency", "planer", setting="b1s128t1", seq=128)
    skim = Build("m/skim", "m", "planer skim alone", "planer-pass", seq=384)
    peer = Build("m/int8", "m", "ORT dynamic INT8", "peer")
    headline, threads2, long = (Setting("m", 1, 128, 1), Setting("m", 1, 128, 2),
                                Setting("m", 1, 384, 1))
    assert [target.belongs(s) for s in (headline, threads2, long)] == [True, False, False]
    assert [skim.belongs(s) for s in (headline, threads2, long)] == [False, False, True]
    assert peer.belongs(long) and not peer.belongs(Setting("other", 1, 128, 1))


def _doc(tmp_path: Path) -> dict:
    builds = [
        Build("m/original", "m", "original", "original", path="m.onnx", sst2=80.0,
              agnews=85.0, fidelity=1.0),
        Build("m/ort-int8", "m", "ORT dynamic INT8", "peer", status="ok", sst2=79.5,
              agnews=84.0, fidelity=0.99, compile_s=3.2, compile_peak_mb=410),
        Build("m/ort-opt", "m", "ORT transformer optimizer", "peer",
              status="error: cannot fuse | at all"),
        Build("m/t50", "m", "planer 50% latency", "planer", status="missed (exit 3)",
              setting="b1s128t1", sst2=78.0, agnews=None, flops_ratio=0.52),
        Build("m/t50r", "m", "planer 50% latency + recover 5m", "planer", path="r.onnx",
              setting="b1s128t1", recover="5m", stsb=86.1, pooled_cosine=0.9712,
              neighbours=0.8, sst2=78.5),
    ]
    rows = {"m/original": {"median_ms": 20.0, "ratio": 1.0, "runtime_peak_mb": 300},
            "m/ort-int8": {"median_ms": 10.0, "ratio": 0.5, "runtime_peak_mb": 250},
            "m/ort-opt": {}, "m/t50": {"error": "RuntimeException: bad graph"},
            "m/t50r": {"median_ms": 10.5, "ratio": 0.525}}
    return {"command": "python benchmarks/run.py --quick", "date": "2026-01-02",
            "machine": "intel-xeon-2c", "planer": "0.1.0", "commit": "commit abc",
            "work": str(tmp_path), "sources": {"m": "Model M"}, "wall_s": 90.0,
            "baseline_runtime_mb": 120, "probe_test_texts": {"sst2": 872, "agnews": 2000},
            "fingerprint": {"cpu": "Intel(R) Xeon(R) Processor", "usable_cores": "2",
                            "logical_cores": "2", "onnxruntime": "1.32.0", "onnx": "1.19",
                            "numpy": "2.3", "python": "3.11"},
            "builds": [dataclasses.asdict(b) for b in builds],
            "settings": [{"source": "m", "batch": 1, "seq": 128, "threads": 1,
                          "tag": "b1s128t1", "title": "Model M · batch 1", "rounds": 40,
                          "rows": rows, "plot": "x.png"}]}


def test_markdown_names_the_command_and_records_failures(tmp_path):
    text = render_markdown(_doc(tmp_path))
    table = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert table[1] == ("| original | ok | 1.000 | 20.00 | 80.00 | 85.00 | 1.0000 | — | — "
                        "| — | 300 |")
    assert table[2].startswith("| ORT dynamic INT8 | ok | 0.500 | 10.00 | 79.50 |")
    # A failed build keeps its row with the error; so does a model that failed to time.
    assert "| ORT transformer optimizer | error: cannot fuse \\| at all | — |" in text
    assert "| planer 50% latency | timing failed: RuntimeException: bad graph | — |" in text
    # Intro, the setting's table, its figure and the builds table each name the command.
    assert text.count("Produced by `python benchmarks/run.py --quick`") == 5
    assert "![latency vs quality, Model M · batch 1](x.png)" in text


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    doc = _doc(tmp_path)
    out = tmp_path / "plot.png"
    plot_setting(doc, doc["settings"][0], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("cpu", "expected"), [
    ("Intel(R) Xeon(R) Processor", "intel-xeon-2c"),
    ("AMD EPYC 7763 64-Core Processor", "amd-epyc-7763-2c"),
    ("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", "intel-core-i7-2c"),
])
def test_machine_slug_is_short_and_file_safe(cpu, expected):
    assert machine_slug({"cpu": cpu, "usable_cores": "2"}) == expected


def test_error_line_prefers_the_last_error_and_drops_colour_codes():
    output = ("\x1b[0;93mW:onnxruntime: merging shape info\x1b[m\n"
              "\x1b[31merror:\x1b[0m the target is out of reach.\nwrote nothing\n")
    assert error_line(output) == "error: the target is out of reach."
    assert error_line("") == "no output"


def test_fusion_status_says_when_attention_was_not_fused():
    fused = 'noise\nFUSED {"Attention": 0, "BiasGelu": 6, "SkipLayerNormalization": 12}\n'
    assert _fusion_status(fused) == ("ok; fused BiasGelu 6, SkipLayerNormalization 12; "
                                     "attention not fused")
    assert _fusion_status('FUSED {"Attention": 3}') == "ok; fused Attention 3"


def test_quality_table_lists_each_model_once_with_sts_b_and_agreement(tmp_path):
    text = render_markdown(_doc(tmp_path))
    quality = text.split("## Quality")[1].split("## Builds")[0]
    rows = [ln for ln in quality.splitlines() if ln.startswith("| m |")]
    # Models without a file (failed builds) have no quality to show.
    assert [r.split(" | ")[1] for r in rows] == ["original", "planer 50% latency + recover 5m"]
    assert rows[1] == ("| m | planer 50% latency + recover 5m | b1s128t1 | 86.10 | 0.9712 "
                       "| 0.8000 | 78.50 | — | — |")


def test_recovery_builds_compile_each_latency_target_again_with_its_budget(monkeypatch,
                                                                            tmp_path):
    calls = []

    def fake_compile(source, folder, label, kind, flags, **kwargs):
        calls.append((label, flags, kwargs.get("recover")))
        return Build(folder.name, "m", label, kind, recover=kwargs.get("recover"))

    monkeypatch.setattr(run, "compile_planer", fake_compile)
    args, mode = run.parse_args(["--quick", "--recover", "5m", "--recover-steps", "3"])
    assert args.suffix == "-quick-custom"  # a narrowed run never overwrites the quick one
    source = run.Source("m", "M", Path("m.onnx"), Path("tok"))
    run.planer_builds(source, [Setting("m", 1, 128, 1)], mode, tmp_path, run.Progress())
    assert [(label, budget) for label, _, budget in calls] == [
        ("planer 50% latency", None), ("planer 50% latency + recover 5m", "5m"),
        ("planer 50% latency + recover 3 steps", "3 steps")]
    assert calls[1][1][-2:] == ["--recover", "5m"]
    assert calls[2][1][-2:] == ["--recover-steps", "3"]
    assert "--recover" not in calls[0][1]
