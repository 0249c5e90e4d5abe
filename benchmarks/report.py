"""Presents benchmarks/run.py's results: the markdown document and the latency-vs-quality plots.

Both take only the results document, the dict run.py also saves as JSON (`doc`:
fingerprint, builds, one section per setting with its timed rows), and measure nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKS = (("sst2", "SST-2"), ("agnews", "AG News"))
MARKERS = "*s^DovPX<>hp8d"
COLORS = {"original": "black", "peer": "tab:orange", "planer": "tab:blue",
          "planer-pass": "tab:green", "planer+int8": "tab:purple"}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x (latency), higher y (quality).

    Returned in increasing x; of equal points, the first listed.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    for i in order:
        if not front or points[i][1] > points[front[-1]][1]:
            front.append(i)
    return front


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _status(build: dict[str, Any], row: dict[str, Any]) -> str:
    return f"timing failed: {row['error']}" if "error" in row else build["status"]


def setting_table(doc: dict[str, Any], section: dict[str, Any]) -> list[str]:
    """The markdown lines of one setting's table, in build order."""
    lines = [
        "| model | status | latency ratio | median ms | SST-2 % | AG News % | fidelity "
        "| FLOPs ratio | compile s | compile peak MB | runtime peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for build in doc["builds"]:
        row = section["rows"].get(build["key"])
        if row is None:
            continue
        cells = [_cell(build["label"]), _cell(_status(build, row)), _cell(row.get("ratio"), 3),
                 _cell(row.get("median_ms")), _cell(build["sst2"]), _cell(build["agnews"]),
                 _cell(build["fidelity"], 4), _cell(build["flops_ratio"], 3),
                 _cell(build["compile_s"], 1), _cell(build["compile_peak_mb"], 0),
                 _cell(row.get("runtime_peak_mb"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def quality_table(doc: dict[str, Any]) -> list[str]:
    """The markdown lines of the quality table: every built model once, per source."""
    lines = [
        "| source | model | built for | STS-B dev | pooled cosine | neighbours@10 | SST-2 % "
        "| AG News % | fidelity |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for build in doc["builds"]:
        if build.get("path") is None:
            continue
        built_for = build["setting"] or (f"s{build['seq']}" if build["seq"] else "any")
        cells = [_cell(build["source"]), _cell(build["label"]), built_for,
                 _cell(build.get("stsb")), _cell(build.get("pooled_cosine"), 4),
                 _cell(build.get("neighbours"), 4), _cell(build["sst2"]),
                 _cell(build["agnews"]), _cell(build["fidelity"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _se(n: int, p: float = 0.8) -> float:
    """Standard error (points) of an accuracy `p` measured on `n` texts."""
    return 100 * (p * (1 - p) / n) ** 0.5


def render_markdown(doc: dict[str, Any]) -> str:
    """Writes the results document (tables, plot links, builds) as markdown."""
    fp, cmd, sizes = doc["fingerprint"], f"`{doc['command']}`", doc["probe_test_texts"]
    lines = [
        f"# planer vs ONNX Runtime's optimizer and INT8 quantization, {doc['date']}",
        "",
        f"Produced by {cmd} on {fp['cpu']} ({fp['usable_cores']} usable of "
        f"{fp['logical_cores']} logical cores), onnxruntime {fp['onnxruntime']}, onnx "
        f"{fp['onnx']}, numpy {fp['numpy']}, Python {fp['python']}; planer {doc['planer']} "
        f"at {doc['commit']}. Wall time {doc['wall_s'] / 60:.1f} min.",
        "",
        "How to read the tables:",
        "",
        "- **latency ratio**: median over interleaved rounds of the model's latency divided "
        "by the original's in the same round; all models of a table were timed in one "
        "process (ORT CPU, graph optimizations `all`, the table's intra-op threads, random "
        "token ids, no padding). Below 1 is faster. **median ms** is for reference only: "
        "the machine is shared, so compare ratios, not times.",
        "- **SST-2 / AG News**: accuracy of the probe of `benchmarks/probe.py` (logistic "
        "regression on mean-pooled embeddings; SST-2: 5000 seeded `sst2/train.tsv` rows -> "
        "`sst2/dev.tsv`; AG News: first 4000 `agnews/dev.tsv` rows -> next 2000). With "
        f"{sizes['sst2']:,} and {sizes['agnews']:,} test texts, an accuracy near 80% has a "
        f"standard error of about {_se(sizes['sst2']):.1f} and {_se(sizes['agnews']):.1f} "
        "points; smaller differences are noise. **fidelity**: mean cosine between the "
        "model's and the original's pooled embeddings on those "
        f"{sizes['sst2'] + sizes['agnews']:,} test texts.",
        "- **compile s / peak MB**: wall time and peak RSS of the child process that built "
        "the model (interpreter and imports included); **runtime peak MB**: peak RSS of a "
        "child that loads the model and runs it three times at the table's shape (Python "
        f"and onnxruntime alone: {_cell(doc['baseline_runtime_mb'], 0)} MB).",
        "- planer is calibrated on `../shared/data/sst2/train.tsv` as `planer compile` "
        "reads it. Latency targets are compiled for the table's batch, tokens and threads; "
        "`met`/`missed` is planer's own verdict from its compile-time measurement (on "
        "`missed`, exit 3, its fastest model is timed here anyway), while the latency ratio "
        "column re-measures independently. Single passes at a FLOPs budget are compiled at "
        "batch 1 and the table's tokens. **FLOPs ratio** is planer's report at its compile "
        "shape. `+ ORT INT8` rows are the planer model above them through `quantize_dynamic` "
        "(compile s: the quantization alone).",
    ]
    if "paraphrase-l3" in doc["sources"]:
        lines.append(
            "- paraphrase-MiniLM-L3-v2 ships no tokenizer; it uses bert-base-uncased's "
            "vocabulary, as all-MiniLM-L6-v2 does, so both are probed with the latter's "
            "tokenizer. Its first two outputs echo `input_ids` and `attention_mask`; the "
            "probe pools its token embeddings (the first rank-3 output).")
    for section in doc["settings"]:
        lines += ["", f"## {section['title']}", "",
                  f"Produced by {cmd}; {section['rounds']} interleaved rounds.", "",
                  *setting_table(doc, section), ""]
        if section.get("plot"):
            lines += [f"![latency vs quality, {section['title']}]({section['plot']})", "",
                      f"*Produced by {cmd}. x: latency ratio to the original; y: probe "
                      "accuracy, bars ±1 standard error; one marker per model; the dashed "
                      "line and gray rings mark the Pareto front (no other model is both "
                      "faster and more accurate).*"]
    lines += ["", "## Quality", "",
              f"Produced by {cmd}. STS-B dev: Spearman x100 of the cosine of mean-pooled "
              "embeddings against the gold scores (`../shared/data/stsb/dev.tsv`, 1,500 "
              "pairs); pooled cosine and neighbours@10: on the last 2,000 `agnews/dev.tsv` "
              "texts, the mean cosine to the original's embedding and the share of each "
              "text's 10 nearest neighbours the original also returns "
              "(`benchmarks/quality.py`); SST-2, AG News and fidelity as above. "
              "`+ recover TIME` rows are the latency target above them distilled from the "
              "original (`planer compile --recover TIME`).", "",
              *quality_table(doc)]
    lines += ["", "## Builds", "", f"Produced by {cmd}. `$WORK` is the run's work folder "
              f"(`{doc['work']}`).", "",
              "| source | model | built for | command | status |", "|---|---|---|---|---|"]
    for build in doc["builds"]:
        built_for = build["setting"] or (f"s{build['seq']}" if build["seq"] else "any")
        lines.append(f"| {build['source']} | {build['label']} | {built_for} | "
                     f"`{_cell(build['command'])}` | {_cell(build['status'])} |")
    return "\n".join(lines) + "\n"


def plot_setting(doc: dict[str, Any], section: dict[str, Any], path: Path) -> None:
    """Draws latency ratio vs probe accuracy for one setting, Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(b, section["rows"][b["key"]]) for b in doc["builds"]
              if "ratio" in section["rows"].get(b["key"], {})]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (task, title) in zip(axes, TASKS, strict=True):
        shown = [(b, r) for b, r in models if b[task] is not None]
        for i, (build, row) in enumerate(shown):
            ax.scatter(row["ratio"], build[task], marker=MARKERS[i % len(MARKERS)], s=90,
                       color=COLORS[build["kind"]], label=build["label"], zorder=3)
            ax.errorbar(row["ratio"], build[task], fmt="none", alpha=0.4, zorder=2,
                        yerr=_se(doc["probe_test_texts"][task], build[task] / 100),
                        ecolor=COLORS[build["kind"]])
        front = pareto_front([(r["ratio"], b[task]) for b, r in shown])
        xs, ys = [shown[i][1]["ratio"] for i in front], [shown[i][0][task] for i in front]
        ax.plot(xs, ys, "--", color="gray", zorder=2, label="Pareto front")
        ax.scatter(xs, ys, s=300, facecolors="none", edgecolors="gray", zorder=2)
        ax.axvline(1.0, color="lightgray", linewidth=1, zorder=1)
        ax.set_xlabel("latency ratio to the original (lower is faster)")
        ax.set_ylabel(f"{title} probe accuracy (%)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(section["title"])
    fig.text(0.01, 0.01, f"{doc['command']} · {doc['date']} · {doc['machine']}", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 0.8, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
