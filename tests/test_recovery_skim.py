"""Recovery of token-skimmed models: the skim mirror equals the graph, trains, writes back."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
import torch

from planer.compiler.calibration import CalibrationSet, build_calibration, model_input_infos
from planer.compiler.driver.pipeline import compile_plan, read_canonical
from planer.compiler.loading import load_model
from planer.fixtures.build import example_inputs, fixture_path
from planer.passes.skim_fit import fit_predictors
from planer.passes.token_skim import TokenSkimConfig, apply_token_skim
from planer.recovery import skim
from planer.recovery.distill import RecoveryReport, recover
from planer.recovery.train import RecoveryConfig, Student, build_student
from tests.conftest import write_word_calibration

# Layer 0 keeps 3 of 4 heads; half of the real tokens enter layer 1 (the fitted predictor's
# choice, [CLS] always), the rest are forwarded to the output.
PLAN = {"layers": [{"heads": 3}, {"skim_keep": 0.5}]}
ATOL = 1e-4
POINT = "layer1/skim"
# Noise on kept projections stands in for a poor rewrite (see tests/test_recovery.py), and
# the predictor's output bias is shifted: the hard choice (a top-k) is unchanged, but its
# soft keep probability σ(s) starts far above the planned 0.5 for the skim loss to pull back.
NOISE = {"layer0/attn/o/weight": 0.1, "layer1/attn/v/weight": 0.1, "layer1/attn/o/weight": 0.1}
B2 = f"{POINT}/const/predictor/b2"
FORWARD = (f"{POINT}/forward/w", f"{POINT}/forward/b")  # the fitted forwarding map
SHIFT = 2.5  # σ(s + 2.5): a soft keep ratio near 0.8 where the plan keeps 0.5
CONFIG = RecoveryConfig(lr=1e-3, batch_size=16, eval_every=10, threads=1)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _compile(folder: Path, family: str, *, lowering: str = "ort") -> Path:
    text, vocab = write_word_calibration(folder)
    return compile_plan(fixture_path(family, "dynamo"), folder / "out", plan_data=PLAN,
                        calibration=text, tokenizer=vocab, seq_len=16,
                        target_runtime=lowering).model_path


def _feed(family: str) -> dict[str, np.ndarray]:
    return example_inputs(family, batch=3, seq=20, seed=1)  # row 1 is padded


def _student(path: Path) -> Student:
    return build_student(load_model(path), threads=1)


def _two_points(path: Path, lowering: str, maps: dict[int, Any] | None = None) -> Path:
    """Writes the bert fixture skimmed before layer 0 (70%) and layer 1 (50% of those),
    with fitted predictors and, where given, forwarding maps."""
    model, spec = read_canonical(fixture_path("bert", "dynamo"))
    feeds = [example_inputs("bert", batch=4, seq=20, seed=s) for s in range(3)]
    fit = fit_predictors(model, spec, [0, 1], feeds, steps=50)
    apply_token_skim(model, spec, TokenSkimConfig(keep={0: 0.7, 1: 0.5}, forward=maps or {},
                                                  predictors=fit.predictors, lowering=lowering))
    ir.save(model, path)
    return path


def _point(student: Student) -> skim.SkimMirror:
    return next(m for m in student.mirror.modules() if isinstance(m, skim.SkimMirror))


@pytest.mark.parametrize(("family", "lowering"), [("bert", "ort"), ("roberta", "ort"),
                                                  ("distilbert", "ort"), ("bert", "tensorrt")])
def test_skim_mirror_equals_the_emitted_model(family: str, lowering: str,
                                              tmp_path: Path) -> None:
    path = _compile(tmp_path, family, lowering=lowering)
    student = _student(path)
    assert student.check(load_model(path), _feed(family)) <= ATOL
    kinds = [kind for kind, _ in student.mirror.described]
    assert kinds.count("skim") == 1 and kinds[-1] in ("skim_out", "LayerNormalization")
    predictor = {f"{POINT}/predictor/{n}" for n in ("gamma", "beta", "w1", "b1", "w2")}
    assert predictor | {B2} | set(FORWARD) <= set(student.mirror.trained())
    assert student.stream.aux and all("skim" not in str(v.name) for v in student.stream.aux)


def test_a_wrong_skim_mirror_fails_the_check(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = _compile(tmp_path, "bert")
    model, feed = load_model(path), _feed("bert")
    student = _student(path)
    point = _point(student)
    point.ratio = 0.9  # keeps more tokens than the graph
    assert student.check(model, feed) > ATOL
    point.ratio = 0.5
    assert student.check(model, feed) <= ATOL
    with torch.no_grad():  # the predictor ranks tokens differently
        student.mirror.trained()[f"{POINT}/predictor/w2"].neg_()
    assert student.check(model, feed) > ATOL
    student = _student(path)
    # Skimmed rows forwarded as they left, where the graph maps them (passes/skim_forward).
    assert _point(student).forward_map is not None
    with monkeypatch.context() as patch:
        patch.setattr(skim.SkimMirror, "forwarded", lambda self, x: x)
        assert student.check(model, feed) > ATOL
    assert student.check(model, feed) <= ATOL
    # Skimmed rows computed by the later layers instead of forwarded, as the graph does.
    monkeypatch.setattr(skim.SkimState, "mix", lambda self, y: y)
    assert student.check(model, feed) > ATOL


@pytest.mark.parametrize("lowering", ["ort", "tensorrt"])
def test_two_cumulative_skim_points(lowering: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Before layer 0 (70%) and layer 1 (50% of those): built by the pass directly, since
    # the tiny fixtures have two layers only. Tokens leaving at either point hold the state
    # they left with.
    path = _two_points(tmp_path / "two.onnx", lowering)
    student = _student(path)
    assert [k for k, _ in student.mirror.described if "skim" in k] == ["skim", "skim",
                                                                       "skim_out"]
    feed = example_inputs("bert", batch=3, seq=20, seed=7)
    assert student.check(load_model(path), feed) <= ATOL

    def last_stage_only(self: skim.SkimState, y: torch.Tensor) -> torch.Tensor:
        x, before, after, _ = self.stages[-1]
        return after[..., None] * y + (before - after)[..., None] * x

    monkeypatch.setattr(skim.SkimState, "mix", last_stage_only)
    assert student.check(load_model(path), feed) > ATOL


def test_shifting_the_predictor_bias_keeps_the_graph_decision(tmp_path: Path) -> None:
    # What makes the skim loss's start in the recovery test legitimate: the keep rule is a
    # per-sequence top-k, so a constant added to every score changes no decision.
    path = _compile(tmp_path, "bert")
    shifted = _with_noise(load_model(path), {}, b2_shift=3.0)
    out = tmp_path / "shifted.onnx"
    ir.save(shifted, out)
    student = _student(out)
    assert student.check(load_model(out), _feed("bert")) <= ATOL
    with torch.no_grad():
        keep = student.mirror(*student.inputs(_feed("bert"))).skim_keep
    assert keep[0] > 0.8  # σ(s + 3) is far above the plan


def _with_noise(model: ir.Model, noise: dict[str, float], *, b2_shift: float) -> ir.Model:
    ir.external_data.load_to_model(model)
    rng = np.random.default_rng(0)
    for name, scale in noise.items():
        value = model.graph.initializers[name]
        array = value.const_value.numpy()  # type: ignore[union-attr]
        value.const_value = ir.tensor(array + rng.normal(0.0, scale, array.shape)
                                      .astype(array.dtype), name=name)
    value = model.graph.initializers[B2]
    array = value.const_value.numpy()  # type: ignore[union-attr]
    value.const_value = ir.tensor((array + b2_shift).astype(array.dtype), name=B2)
    return model


@dataclasses.dataclass
class _Recovered:
    before: ir.Model
    after: ir.Model
    report: RecoveryReport
    calib: CalibrationSet
    path: Path

    def again(self, config: RecoveryConfig) -> ir.Model:
        """Recovers the same noisy model with another recipe; returns the written model."""
        model = load_model(self.path)
        recover(fixture_path("bert", "dynamo"), model, self.calib, budget_s=None,
                max_steps=self.report.steps, config=config)
        return model


@pytest.fixture(scope="module")
def recovered(tmp_path_factory: pytest.TempPathFactory) -> _Recovered:
    folder = tmp_path_factory.mktemp("skim-recovery")
    torch.set_num_threads(1)
    path = _compile(folder, "bert")
    noisy = folder / "noisy.onnx"
    ir.save(_with_noise(load_model(path), NOISE, b2_shift=SHIFT), noisy)
    text = folder / "calib.txt"
    calib = build_calibration(text, model_input_infos(load_model(noisy)),
                              tokenizer=folder / "tok", seq_len=32)
    model = load_model(noisy)
    report = recover(fixture_path("bert", "dynamo"), model, calib, budget_s=None,
                     max_steps=60, config=CONFIG)
    before = load_model(noisy)
    ir.external_data.load_to_model(before)
    return _Recovered(before, model, report, calib, noisy)


def _soft_keep(model: ir.Model, calib: CalibrationSet) -> float:
    student = build_student(model, threads=1)
    keeps = []
    with torch.no_grad():
        for feed in calib.holdout:
            keeps.extend(student.mirror(*student.inputs(feed)).skim_keep)
    return float(np.mean(keeps))


def test_recovery_with_skim_lowers_the_loss_and_pulls_the_keep_ratio_to_plan(
        recovered: _Recovered) -> None:
    report = recovered.report
    assert report.steps == 60 and report.mirror_max_abs_diff <= ATOL
    assert report.written_max_abs_diff <= ATOL
    assert report.loss["last"] < 0.5 * report.loss["first"]  # distillation only
    before, after = report.fidelity_before["pooled_cosine"], report.fidelity_after["pooled_cosine"]
    assert after > before + 0.5 * (1 - before)
    start, end = _soft_keep(recovered.before, recovered.calib), \
        _soft_keep(recovered.after, recovered.calib)
    assert start > 0.7 and abs(end - 0.5) < 0.1  # Transkimmer's skim loss at work
    # report.json says the same, on the holdout the mirror measured.
    assert report.skim["before"][POINT]["plan"] == 0.5
    assert report.skim["before"][POINT]["soft_keep"] > 0.7
    assert abs(report.skim["after"][POINT]["soft_keep"] - 0.5) < 0.1
    # The predictor and the forwarding map were trained end to end, not only the bias.
    for name in (f"{POINT}/predictor/w1", f"{POINT}/predictor/w2", B2, *FORWARD):
        assert name in report.written
        assert not np.array_equal(_array(recovered.before, name), _array(recovered.after, name))


def test_without_the_skim_loss_the_keep_ratio_is_left_to_distillation(
        recovered: _Recovered) -> None:
    # With a forwarding map the straight-through gradient of distillation alone moves σ(s)
    # from its start (0.84 here) toward and past the plan (measured 0.48 without the skim
    # loss, 0.52 with it); before the maps it stayed above 0.65. The skim loss is what
    # pins the ratio; without it the ratio is whatever distillation leaves.
    model = recovered.again(dataclasses.replace(CONFIG, skim_weight=0.0))
    start, end = _soft_keep(recovered.before, recovered.calib), _soft_keep(model, recovered.calib)
    assert start > 0.7 and end < start - 0.2
    assert not np.array_equal(_array(model, f"{POINT}/predictor/w2"),
                              _array(recovered.after, f"{POINT}/predictor/w2"))


def test_gumbel_estimator_trains_and_writes_back(recovered: _Recovered) -> None:
    model = recovered.again(dataclasses.replace(CONFIG, skim_estimator="gumbel"))
    assert abs(_soft_keep(model, recovered.calib) - 0.5) < 0.15


def test_skim_write_back_keeps_structure_and_names(recovered: _Recovered, tmp_path: Path
                                                   ) -> None:
    assert _structure(recovered.after) == _structure(recovered.before)
    out = tmp_path / "recovered.onnx"
    ir.save(recovered.after, out)
    student = _student(out)  # the written model reads back, and the mirror still equals it
    assert student.check(load_model(out), recovered.calib.holdout[0]) <= ATOL


def _array(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()  # type: ignore[union-attr]


def _structure(model: ir.Model) -> list[tuple[Any, ...]]:
    nodes = [(n.op_type, n.name, tuple(v.name if v is not None else None for v in n.inputs),
              tuple(v.name for v in n.outputs)) for n in model.graph]
    inits = [(name, tuple(v.const_value.shape.numpy()), v.const_value.dtype)  # type: ignore
             for name, v in sorted(model.graph.initializers.items())]
    return [*nodes, *inits]


def test_earlier_layers_leave_skimmed_rows_out_of_their_loss(tmp_path: Path) -> None:
    # Skim before layer 0: layer 0 never computes the skimmed rows in the graph, and the
    # forwarding map is fitted to the final rows, so neither is a target for its states.
    from planer.recovery.runtime import TeacherOutput
    from planer.recovery.train import distill_loss

    text, vocab = write_word_calibration(tmp_path)
    path = compile_plan(fixture_path("bert", "dynamo"), tmp_path / "out",
                        plan_data={"layers": [{"skim_keep": 0.5}, {}]}, calibration=text,
                        tokenizer=vocab, seq_len=16).model_path
    student = _student(path)
    entry, aux, mask = student.inputs(_feed("bert"))
    with torch.no_grad():
        out = student.mirror(entry, aux, mask)
    first, last = out.layer_rows
    assert last is None and first is not None and not first.requires_grad
    skimmed = (mask > 0) & (first == 0)
    assert skimmed.any() and ((first == 1) | skimmed | (mask == 0)).all()
    teacher = TeacherOutput([t.numpy() for t in out.layers], out.end.numpy())
    moved = dataclasses.replace(out, layers=[out.layers[0] + 5 * skimmed[..., None],
                                             out.layers[1]])
    config = RecoveryConfig()
    loss = distill_loss(moved, teacher, mask, config, [1.0, 1.0], tokens=float(mask.sum()),
                        sequences=float(mask.shape[0]))
    assert loss.distill == pytest.approx(0.0, abs=1e-6)  # the skim loss aside


@pytest.mark.parametrize("lowering", ["ort", "tensorrt"])
def test_context_maps_mirrored_and_trained(lowering: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Skimmed rows read the mean of the rows kept to the end (passes/skim_forward.py): the
    # mirror computes it from its own output, and v is a trained weight like w and b.
    from planer.passes.skim_forward import context_name
    from tests.test_skim_forward import context_map

    path = _two_points(tmp_path / "context.onnx", lowering,
                       {0: context_map(1, v_scale=0.3), 1: context_map(2, v_scale=0.3)})
    student = _student(path)
    feed = example_inputs("bert", batch=3, seq=20, seed=7)
    assert student.check(load_model(path), feed) <= ATOL
    assert {context_name(0), context_name(1)} <= set(student.mirror.trained())
    for point in (m for m in student.mirror.modules() if isinstance(m, skim.SkimMirror)):
        monkeypatch.setattr(point, "context_map", None)
    assert student.check(load_model(path), feed) > ATOL


def test_mirror_bound_is_absolute_for_small_outputs_and_relative_for_large(
        tmp_path: Path) -> None:
    from planer.recovery.distill import ATOL, allowed_diff
    from tests.conftest import run_ort

    assert allowed_diff(0.3) == allowed_diff(1.0) == ATOL
    assert allowed_diff(250.0) == pytest.approx(250 * ATOL)
    path = _compile(tmp_path, "bert")
    student, model, feed = _student(path), load_model(path), _feed("bert")
    diff, scale = student.check_scaled(model, feed)
    real = feed["attention_mask"].astype(bool)
    assert scale == pytest.approx(float(np.abs(run_ort(path, feed)[0][real]).max()), rel=1e-6)
    assert diff == student.check(model, feed) <= ATOL
