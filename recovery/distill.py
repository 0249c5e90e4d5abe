"""Recovers a compiled model's behaviour by label-free distillation from the original.

    batch ─┬─ Teacher (original, ORT) ─────────────── t_1..t_L, t_end ─┐
           └─ Prefix (compiled, ORT) ─ entry, masks ─ Mirror (torch) ─ s_1..s_L, s_end ─┤
    loss = Σ_l ||s_l − t_l||² / ||t_l||²  (per real token, layer l at the same depth)
         + (1 − cos(mean-pool s_end, mean-pool t_end))  (+ MoE router regression)
    AdamW (seeded), linear warm-up, cosine or linear decay over the step or time budget,
    held-out pooled cosine every `eval_every` steps: the best weights are kept, training
    stops early after `patience` evaluations without a gain
    ─▶ best weights written back into the compiled graph's initializers (same names)
    ─▶ the graph in ORT must equal the mirror within 1e-4 (so the written model is the
       one that was trained)

The mirror must equal the compiled model in ORT within 1e-4 before training starts;
otherwise recovery refuses (training a different model than the one shipped would
be worse than not training). Nothing is held for the whole corpus: teacher outputs are
computed per batch; only the small holdout is cached.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from planer.compiler.calibration import CalibrationSet, load_tokenizer, model_input_infos
from planer.compiler.errors import BadInputError, PlanerError
from planer.recovery import data
from planer.recovery.skim import keep_summary
from planer.recovery.train import (
    Evaluation,
    Holdout,
    RecoveryConfig,
    Student,
    Trainer,
    World,
    build_student,
    load_teacher,
)

logger = logging.getLogger(__name__)

ATOL = 1e-4  # the mirror and the graph in ORT must agree this closely (max |Δ|)


def allowed_diff(scale: float) -> float:
    """Returns the mirror check's bound for outputs whose largest magnitude is `scale`.

    ATOL absolute for outputs up to magnitude 1, ATOL relative to the largest beyond: two
    float32 programs summing in different orders through 30 layers of a decoder whose
    outputs reach the hundreds (SmolLM2) differ by about 1e-4 there, while a wrong
    mirror (a missed rotation, a wrong keep rule) differs by whole units.
    """
    return ATOL * max(1.0, scale)


class RecoveryError(PlanerError):
    """The mirror does not reproduce the compiled model, so recovery did not train."""


@dataclasses.dataclass
class RecoveryReport:
    """What recovery did and measured (JSON-ready through `to_dict`)."""

    steps: int
    sequences: int
    tokens: int
    wall_s: float
    train_s: float
    stopped: str  # "steps", "budget" or "early"
    best_step: int
    loss: dict[str, Any]
    fidelity_before: dict[str, float]
    fidelity_after: dict[str, float]
    mirror_max_abs_diff: float
    written_max_abs_diff: float
    trained_tensors: int
    trained_params: int
    layer_loss: bool
    parts: dict[str, Any]
    config: dict[str, Any]
    world_size: int = 1
    int8_simulated: int = 0  # projection weights trained under simulated dynamic INT8
    # Per skim point: planned keep ratio and held-out soft keep ratio σ(s), before/after.
    skim: dict[str, Any] = dataclasses.field(default_factory=dict)
    written: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Returns the report for report.json (the written names are counted, not listed)."""
        result = dataclasses.asdict(self)
        result["written"] = len(self.written)
        return result


Progress = Callable[[str], None] | Any


def recover(
    original_path: Path,
    model: ir.Model,
    calib: CalibrationSet | None,
    *,
    budget_s: float | None,
    max_steps: int | None,
    seed: int = 0,
    progress: Progress | None = None,
    texts: Sequence[str] | None = None,
    tokenizer: Path | Any | None = None,
    config: RecoveryConfig | None = None,
    int8_weights: Collection[str] = (),
) -> RecoveryReport:
    """Distils the original model into the compiled `model` and writes the weights back in place.

    Args:
        original_path: the model `model` was compiled from (the teacher).
        model: the compiled model; its initializers are replaced by the trained ones
            (names, shapes, dtypes and every node unchanged).
        calib: calibration data; its holdout share measures fidelity (never trained on)
            and, without `texts`, its fitting batches are the training data.
        budget_s: wall-clock budget of the whole call, in seconds.
        max_steps: optimizer steps at most.
        seed: seeds torch, the batch order and the text stream.
        progress: a `Callable[[str], None]`, or an object with `bar(label, total)` whose
            result has `advance(n, **fields)`.
        texts: training texts streamed instead of the fitting batches (e.g. a large
            corpus); holdout texts are left out. Needs `tokenizer`.
        tokenizer: a tokenizer folder / tokenizer.json, or a loaded `tokenizers.Tokenizer`.
        config: the recipe (learning rate, schedule, loss weights, batch size...).
        int8_weights: projection weights the quantize stage will make dynamic INT8; the
            mirror rounds them as INT8 will while training and measuring fidelity.

    Raises:
        BadInputError: no budget, no calibration data, or texts without a tokenizer.
        RecoveryError: the mirror does not reproduce the compiled model within 1e-4.
    """
    started = time.perf_counter()
    config = config or RecoveryConfig()
    check_inputs(calib, budget_s, max_steps, texts, tokenizer)
    assert calib is not None
    trainer = _setup(original_path, model, calib, config, seed, int8_weights)
    holdout = Holdout.build(trainer.student, trainer.teacher_run, calib.holdout)
    mirror_diff, scale = trainer.student.check_scaled(model, holdout.feeds[0])
    if mirror_diff > allowed_diff(scale):
        raise RecoveryError(
            f"the torch mirror differs from the compiled model by {mirror_diff:.2e} (more "
            f"than {allowed_diff(scale):.2g}), so recovery would train a different model; "
            "not trained.")
    skim_before = keep_summary(trainer.student.mirror, holdout.inputs)
    batches = training_batches(model, calib, config, seed, texts, tokenizer)
    trainer.set_scales(holdout)
    result = trainer.fit(batches, holdout, deadline=started + budget_s if budget_s else None,
                         max_steps=max_steps, progress=_ProgressAdapter.wrap(progress, budget_s,
                                                                            max_steps))
    trainer.student.restore(result.best_state)
    skim = {"before": skim_before,
            "after": keep_summary(trainer.student.mirror, holdout.inputs)} if skim_before else {}
    written = trainer.student.write_back(model)
    written_diff, scale = trainer.student.check_scaled(model, holdout.feeds[0])
    if written_diff > allowed_diff(scale):
        raise RecoveryError(f"the written model differs from the trained mirror by "
                            f"{written_diff:.2e}; this is a bug in the write-back.")
    return RecoveryReport(
        steps=result.steps, sequences=result.sequences, tokens=result.tokens,
        wall_s=round(time.perf_counter() - started, 2), train_s=round(result.train_s, 2),
        stopped=result.stopped, best_step=result.best_step, loss=result.loss_summary(),
        fidelity_before=result.before.to_dict(), fidelity_after=result.best.to_dict(),
        mirror_max_abs_diff=mirror_diff, written_max_abs_diff=written_diff,
        trained_tensors=len(written), trained_params=trainer.student.trained_params(),
        layer_loss=trainer.layer_loss, parts=trainer.student.parts(),
        config=dataclasses.asdict(config), int8_simulated=len(set(int8_weights)),
        written=written, skim=skim,
    )


def check_inputs(calib: CalibrationSet | None, budget_s: float | None, max_steps: int | None,
                 texts: Sequence[str] | None, tokenizer: Any) -> None:
    """Refuses, in one sentence, what recovery cannot run on.

    Raises:
        BadInputError: no budget, no (or synthetic) calibration data, no holdout, or
            texts without a tokenizer.
    """
    if budget_s is None and max_steps is None:
        raise BadInputError("recovery needs a budget: a wall-clock time or a number of steps.")
    if (budget_s is not None and budget_s <= 0) or (max_steps is not None and max_steps < 1):
        raise BadInputError("the recovery budget must be positive.")
    if calib is None or calib.synthetic:
        raise BadInputError("recovery distils the original model on calibration inputs; "
                            "pass --calibration (text or an .npz of inputs).")
    if not calib.holdout:
        raise BadInputError("recovery needs held-out calibration samples to measure fidelity; "
                            "pass more than one calibration sample.")
    if texts is not None and tokenizer is None:
        raise BadInputError("recovery on texts needs their tokenizer (--tokenizer).")


def _setup(original_path: Path, model: ir.Model, calib: CalibrationSet,
           config: RecoveryConfig, seed: int, int8_weights: Collection[str]) -> Trainer:
    student = build_student(model, threads=config.threads, int8_weights=int8_weights)
    teacher = load_teacher(original_path, threads=config.threads)
    return Trainer(student, teacher, config, seed=seed, world=World())


def training_batches(model: ir.Model, calib: CalibrationSet, config: RecoveryConfig, seed: int,
                     texts: Sequence[str] | None, tokenizer: Any) -> Iterator[data.Feed]:
    """Returns the endless training stream: `texts` (holdout left out) or the fitting batches."""
    if texts is None:
        return data.cycle_batches(calib, seed=seed)
    held = data.holdout_texts(calib)
    kept = [t for t in texts if t not in held]
    tok = tokenizer if hasattr(tokenizer, "encode_batch") else load_tokenizer(tokenizer)
    stream = data.TextBatches(kept, tok, model_input_infos(model), batch_size=config.batch_size,
                              max_len=config.max_len, seed=seed)
    return iter(stream)


class _ProgressAdapter:
    """Turns the caller's progress (a bar factory or a plain callable) into one interface."""

    def __init__(self, say: Callable[[str], None] | None, bar: Any, unit_steps: bool):
        self.say, self.bar, self.unit_steps = say, bar, unit_steps
        self.elapsed = 0

    @staticmethod
    def wrap(progress: Progress | None, budget_s: float | None,
             max_steps: int | None) -> _ProgressAdapter:
        unit_steps = max_steps is not None and budget_s is None
        if progress is not None and hasattr(progress, "bar"):
            total = max_steps if unit_steps else int(budget_s or 0)
            return _ProgressAdapter(None, progress.bar("recovering", total), unit_steps)
        return _ProgressAdapter(progress, None, unit_steps)

    def step(self, step: int, loss: float, elapsed_s: float, fidelity: Evaluation | None) -> None:
        fields: dict[str, Any] = {"loss": round(loss, 5)}
        if fidelity is not None:
            fields["fidelity"] = round(fidelity.pooled_cosine, 4)
        if self.bar is not None:
            advance = 1 if self.unit_steps else int(elapsed_s) - self.elapsed
            self.elapsed += advance if not self.unit_steps else 0
            self.bar.advance(max(advance, 0), **fields)
        elif self.say is not None:
            shown = ", ".join(f"{k} {v}" for k, v in fields.items())
            self.say(f"recovery step {step}: {shown}")


__all__ = ["RecoveryConfig", "RecoveryError", "RecoveryReport", "Student", "recover"]
