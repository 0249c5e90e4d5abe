"""The pieces of recovery training: student, teacher, holdout, loss and the loop itself.

`distill.recover` runs them in one process, `ddp` in several: the loop reads the stop
decision and the schedule position through a `World`, which in one process is local
and under DistributedDataParallel is rank 0's, broadcast, so every rank takes the same
number of steps at the same learning rate.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch.nn import functional as F

from planer.compiler.canonicalize import canonicalize
from planer.compiler.loading import load_model
from planer.compiler.support import prepare
from planer.recovery import data
from planer.recovery.fakequant import Simulation
from planer.recovery.head import HeadMirror, cut_head
from planer.recovery.mirror import Mirror, MirrorOutput, max_abs_diff, param_count, write_back
from planer.recovery.moe import activation_l1
from planer.recovery.runtime import (
    Prefix,
    Teacher,
    TeacherOutput,
    canonical_copy,
    compiled_session,
)
from planer.recovery.skim import set_estimator
from planer.recovery.structure import Stream, describe, read_stream

Feed = Mapping[str, np.ndarray]
STOPS = ("", "steps", "budget", "early")


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
    """The training recipe.

    Attributes:
        lr: peak AdamW learning rate.
        weight_decay: AdamW decay on matrices (biases and norms are not decayed).
        warmup: share of the budget spent warming the learning rate up linearly.
        schedule: "cosine" or "linear" decay to `min_lr` x lr at the end of the budget.
        min_lr: floor of the decay, as a share of `lr`.
        batch_size: texts per step (the global batch under DDP).
        max_len: tokens per text at most.
        layer_weight: weight of the per-layer hidden-state loss (relative MSE).
        output_weight: weight of (1 - cosine) on the mean-pooled final output.
        router_weight: weight of the MoE routers' expert-norm regression.
        activation_l1: weight of DSTI's L1 penalty on ReLU-fied experts' activations
            (mean |h| per real token; `recovery.moe.activation_l1`).
        kl_weight: weight of KL(teacher ‖ student) on the softened logits when the model
            ends in a classification head (`recovery.head`).
        temperature: the softmax temperature of that KL (scaled back by its square).
        skim_weight: weight of Transkimmer's skim loss (soft keep ratio toward the plan's).
        skim_estimator: how skim predictors get gradients through the hard keep decision,
            "straight_through" or "gumbel" (`recovery.skim`).
        grad_clip: gradient-norm clip (0 turns it off).
        layer_weighting: "uniform", or "error": each layer's term weighted by its initial
            held-out error (mean 1).
        eval_every: steps between held-out evaluations.
        patience: evaluations without a gain before stopping early (0: never).
        threads: torch and ORT intra-op threads (None: torch's default).
    """

    # lr and batch: the best of those tried on MiniLM at 50% FLOPs (STS-B dev, held-out
    # cosine; benchmarks/results/recovery-minilm.json): 3e-4 beat 1e-4 and 1e-3, and at
    # equal tokens 16 texts a step beat 32.
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: float = 0.06
    schedule: str = "cosine"
    min_lr: float = 0.0
    batch_size: int = 16
    max_len: int = 128
    layer_weight: float = 1.0
    output_weight: float = 1.0
    router_weight: float = 0.1
    # Not tuned: small next to the distillation terms (mean |h| of MiniLM's ReLU experts
    # is about 0.1), enough to pull activations toward zero where the teacher allows.
    activation_l1: float = 0.01
    kl_weight: float = 1.0
    temperature: float = 2.0
    skim_weight: float = 1.0
    skim_estimator: str = "straight_through"
    grad_clip: float = 1.0
    layer_weighting: str = "uniform"
    eval_every: int = 25
    patience: int = 8
    threads: int | None = None

    def lr_factor(self, fraction: float) -> float:
        """Returns the learning-rate multiplier at `fraction` of the budget."""
        fraction = min(max(fraction, 0.0), 1.0)
        if self.warmup > 0 and fraction < self.warmup:
            return fraction / self.warmup
        rest = (fraction - self.warmup) / max(1.0 - self.warmup, 1e-9)
        decay = 0.5 * (1.0 + math.cos(math.pi * rest)) if self.schedule == "cosine" \
            else 1.0 - rest
        return self.min_lr + (1.0 - self.min_lr) * decay


class World:
    """One process: its own decisions stand."""

    rank = 0
    size = 1

    def agree(self, stop: str, fraction: float) -> tuple[str, float]:
        """Returns the stop decision and schedule position every process uses."""
        return stop, fraction

    def total(self, value: float) -> float:
        """Returns `value` summed over processes."""
        return value


# ---------------------------------------------------------------- student and teacher


@dataclasses.dataclass
class Student:
    """The compiled model's mirror with its frozen ORT prefix."""

    canonical: ir.Model
    stream: Stream
    mirror: Mirror
    prefix: Prefix
    threads: int
    loss: Any = None  # the student's own loss (recovery.mux scores instances), else distill_loss
    head: HeadMirror | None = None  # a classification head, replayed frozen on the end

    def run(self, entry: torch.Tensor, aux: Mapping[str, torch.Tensor], mask: torch.Tensor,
            module: nn.Module | None = None) -> MirrorOutput:
        """Runs the mirror (or its DDP wrapper `module`), then the head if there is one."""
        out = (module or self.mirror)(entry, aux, mask)
        return out if self.head is None else dataclasses.replace(out, end=self.head(out.end))

    def inputs(self, feed: Feed) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Returns (entry, aux, real-token mask) tensors for one batch."""
        entry, aux = self.prefix.run(feed)
        # The feed's rows, not the entry's: a mux entry holds one row per group.
        mask = data.real_mask(feed, (len(next(iter(feed.values()))), entry.shape[1]))
        return (torch.from_numpy(entry), {k: torch.from_numpy(v) for k, v in aux.items()},
                torch.from_numpy(mask))

    def check(self, model: ir.Model, feed: Feed) -> float:
        """Returns max |mirror - `model` in ORT| on `feed`'s real tokens."""
        return self.check_scaled(model, feed)[0]

    def check_scaled(self, model: ir.Model, feed: Feed) -> tuple[float, float]:
        """Returns (max |mirror - `model` in ORT|, max |`model` in ORT|) on real tokens."""
        session, name = compiled_session(model, threads=self.threads)
        wanted = {i.name for i in session.get_inputs()}
        (expected,) = session.run([name], {k: v for k, v in feed.items() if k in wanted})
        entry, aux, mask = self.inputs(feed)
        training = self.mirror.training
        self.mirror.eval()
        with torch.no_grad(), self.mirror.store.int8.off():  # `model` is the float graph
            got = self.run(entry, aux, mask).end.numpy()
        self.mirror.train(training)
        real = mask.numpy() if got.ndim == 3 else None
        return (max_abs_diff(got, expected, real),
                max_abs_diff(expected, np.zeros_like(expected), real))

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.mirror.trained().items()}

    def restore(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self.mirror.trained().items():
                tensor.copy_(state[name])

    def write_back(self, model: ir.Model) -> list[str]:
        return write_back(model, self.mirror)

    def trained_params(self) -> int:
        return param_count(self.mirror)

    def parts(self) -> dict[str, Any]:
        """Says what is mirrored (trained) and what stays frozen in ORT."""
        parts = describe(self.stream)
        frozen = dict(parts["frozen_in_ort"])  # type: ignore[call-overload]
        frozen["shared_with_frozen_part"] = self.mirror.frozen_shared
        if self.head is not None:
            parts["head"] = {"mirrored_frozen": self.head.described, "loss": "KL on logits"}
        return {**parts, "frozen_in_ort": frozen}


def build_student(model: ir.Model, *, threads: int | None = None,
                  int8_weights: Collection[str] = ()) -> Student:
    """Builds the mirror of the compiled `model` (read from a canonical copy).

    `int8_weights` names the projection weights the quantize stage will make dynamic
    INT8; the mirror simulates their rounding (recovery.fakequant).
    """
    threads = threads or torch.get_num_threads()
    from planer.recovery.mux import build_mux_student, has_mux

    if has_mux(model):
        return build_mux_student(model, threads)
    canonical = canonical_copy(model)
    head = cut_head(canonical)  # the stream then ends at the head's hidden state
    stream = read_stream(canonical)
    mirror = Mirror(stream)
    mirror.store.int8 = Simulation(set(int8_weights))
    return Student(canonical, stream, mirror, Prefix(canonical, stream, threads=threads), threads,
                   head=HeadMirror(head) if head is not None else None)


def load_teacher(original_path: Path, *, threads: int | None = None) -> Teacher:
    """Loads the original model as the teacher (canonical, layer outputs exposed)."""
    original = load_model(original_path)
    prepare(original)  # the spellings compile reads (int8 weights, ORT contrib ops) first
    canonicalize(original)
    return Teacher(original, threads=threads or torch.get_num_threads())


# ---------------------------------------------------------------- holdout


@dataclasses.dataclass
class Evaluation:
    """Held-out fidelity of the student to the teacher."""

    pooled_cosine: float
    pooled_cosine_p5: float
    token_cosine: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 5) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class Holdout:
    """The held-out batches with their student inputs and teacher outputs, cached."""

    feeds: list[dict[str, np.ndarray]]
    inputs: list[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]
    teacher_end: list[torch.Tensor]
    layer_mean_square: list[float]  # the teacher's, per layer
    layer_error: list[float]  # the student's relative squared error per layer, at build time

    @staticmethod
    def build(student: Student, teacher_run: Callable[[Feed], TeacherOutput],
              feeds: Sequence[Feed]) -> Holdout:
        trimmed = [data.trim(f) for f in feeds]
        inputs, ends = [], []
        squares = errors = np.zeros(0)
        for feed in trimmed:
            entry, aux, mask = student.inputs(feed)
            out = teacher_run(feed)
            inputs.append((entry, aux, mask))
            ends.append(torch.from_numpy(out.end))
            with torch.no_grad():
                mine = student.mirror(entry, aux, mask).layers
            m = mask.numpy()[..., None].astype(np.float64)
            sq = np.array([(np.square(t.astype(np.float64)) * m).sum() for t in out.layers])
            err = np.array([(np.square(s.numpy() - t.astype(np.float64)) * m).sum()
                            for s, t in zip(mine, out.layers, strict=False)
                            if s.shape == t.shape])  # a mux backbone's layers hold groups
            squares = sq if not squares.size else squares + sq
            errors = err if not errors.size else errors + err
        # Per element of a layer output: its width, not the end's (a head's end is [B, C]).
        width = out.layers[0].shape[-1] if out.layers else ends[0].shape[-1]
        count = sum(float(i[2].sum()) for i in inputs) * max(1, width)
        error = (errors / np.maximum(squares, 1e-12)).tolist() if errors.size == squares.size \
            else []
        return Holdout(trimmed, inputs, ends, (squares / max(count, 1.0)).tolist(), error)


# ---------------------------------------------------------------- loss


def pooled(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean-pools [B, S, D] over real tokens (a [B, C] output is returned as is)."""
    if x.ndim != 3:
        return x
    m = mask[..., None]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclasses.dataclass
class LossTerms:
    """One batch's loss and its parts (for logging): distillation = layers + output."""

    total: torch.Tensor
    layers: float
    output: float
    router: float = 0.0
    skim: float = 0.0  # weighted skim loss (recovery.skim)
    logits: float = 0.0  # weighted KL on logits (part of the distillation)
    activation: float = 0.0  # weighted L1 on ReLU experts' activations (recovery.moe)

    @property
    def distill(self) -> float:
        return float(self.total.detach()) - self.router - self.skim - self.activation


def distill_loss(out: MirrorOutput, teacher: TeacherOutput, mask: torch.Tensor,
                 config: RecoveryConfig, scales: Sequence[float] | None, *,
                 tokens: float, sequences: float) -> LossTerms:
    """Computes the loss of one (shard of a) batch, normalised by the global counts.

    Dividing sums by the global token and sequence counts (not the shard's) makes the
    shards' losses add up to the whole batch's, which is what DDP's gradient mean needs.
    """
    m = mask[..., None]
    layer = torch.zeros(())
    if scales is not None and out.layers:
        rows = out.layer_rows or [None] * len(out.layers)
        for s, t, scale, r in zip(out.layers, teacher.layers, scales, rows, strict=True):
            diff = (s - torch.from_numpy(t)) ** 2 * (m if r is None else m * r[..., None])
            layer = layer + diff.sum() / (tokens * s.shape[-1] * max(scale, 1e-12))
        layer = layer / len(out.layers)
    cos = F.cosine_similarity(pooled(out.end, mask), pooled(torch.from_numpy(teacher.end), mask),
                              dim=-1)
    output = (1.0 - cos).sum() / sequences
    total = config.layer_weight * layer + config.output_weight * output
    kl = logits_kl(out.end, teacher.end, config.temperature, sequences) \
        if config.kl_weight > 0 else None
    if kl is not None:
        total = total + config.kl_weight * kl
    router = 0.0
    if out.aux_loss is not None:
        total = total + config.router_weight * out.aux_loss
        router = config.router_weight * float(out.aux_loss.detach())
    skim = 0.0
    if out.skim_loss is not None:
        total = total + config.skim_weight * out.skim_loss
        skim = config.skim_weight * float(out.skim_loss.detach())
    return LossTerms(total, float(layer.detach()), float(output.detach()), router, skim,
                     config.kl_weight * float(kl.detach()) if kl is not None else 0.0)


def logits_kl(student: torch.Tensor, teacher: np.ndarray, temperature: float,
              sequences: float) -> torch.Tensor | None:
    """Returns T² · Σ KL(softmax(t/T) ‖ softmax(s/T)) / sequences for logits [B, C].

    None unless the outputs are logits of a classification head (rank 2, C > 1). The T²
    keeps the gradient's scale as T changes (Hinton et al.); dividing by the global
    sequence count makes the shards' terms add up under DDP.
    """
    if student.ndim != 2 or teacher.ndim != 2 or student.shape[-1] < 2:
        return None
    target = F.log_softmax(torch.from_numpy(teacher).to(student.dtype) / temperature, dim=-1)
    kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), target, log_target=True,
                  reduction="sum")
    return kl * temperature ** 2 / sequences


# ---------------------------------------------------------------- the loop


@dataclasses.dataclass
class FitResult:
    """What the loop did."""

    steps: int
    sequences: int
    tokens: int
    train_s: float
    stopped: str
    best_step: int
    before: Evaluation
    best: Evaluation
    best_state: dict[str, torch.Tensor]
    losses: list[float]
    router_losses: list[float] = dataclasses.field(default_factory=list)

    def loss_summary(self, points: int = 40) -> dict[str, Any]:
        """Summarises the distillation loss curve (first/last/min, <= `points` window means).

        MoE routers' regression loss, when there is one, is summarised under "router".
        """
        summary = _curve(self.losses, points)
        if any(self.router_losses):
            summary["router"] = _curve(self.router_losses, points)
        return summary


def _curve(losses: list[float], points: int) -> dict[str, Any]:
    """Returns first/last (mean of the first/last 5%), min and window means of a curve."""
    if not losses:
        return {}
    values = np.asarray(losses)
    edges = np.linspace(0, len(values), min(points, len(values)) + 1).astype(int)
    curve = [[int(b), round(float(values[a:b].mean()), 5)]
             for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
    head = values[: max(1, len(values) // 20)]
    tail = values[-max(1, len(values) // 20):]
    return {"first": round(float(head.mean()), 5), "last": round(float(tail.mean()), 5),
            "min": round(float(values.min()), 5), "curve": curve}


class Trainer:
    """Trains a student's mirror toward the teacher."""

    def __init__(self, student: Student, teacher: Teacher, config: RecoveryConfig, *,
                 seed: int, world: World, module: nn.Module | None = None):
        torch.manual_seed(seed)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.student, self.teacher, self.config, self.world = student, teacher, config, world
        self.module = module or student.mirror
        set_estimator(student.mirror, config.skim_estimator)
        self.layer_loss = config.layer_weight > 0 and \
            len(student.mirror.layer_names) == len(teacher.layers) > 0
        self.scales: list[float] | None = None
        trained = list(student.mirror.trained().values())
        groups = [{"params": [p for p in trained if p.ndim >= 2],
                   "weight_decay": config.weight_decay},
                  {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)

    def teacher_run(self, feed: Feed) -> TeacherOutput:
        return self.teacher.run(feed)

    def set_scales(self, holdout: Holdout) -> None:
        """Normalises each layer's MSE by the teacher's mean square there (held out).

        With `layer_weighting` "error", a layer's term is also weighted by its own share of
        the initial error (mean 1), so the budget goes where the rewrite lost most.
        """
        if not self.layer_loss:
            return
        scales = np.asarray(holdout.layer_mean_square)
        if self.config.layer_weighting == "error" and holdout.layer_error:
            error = np.asarray(holdout.layer_error)
            scales = scales / np.maximum(error / max(error.mean(), 1e-12), 1e-3)
        self.scales = scales.tolist()

    def train_step(self, feed: Feed, fraction: float) -> tuple[float, float, int, int]:
        """Runs one optimizer step on a global batch.

        Returns:
            (distillation loss, weighted router loss, sequences, tokens), whole batch.
        """
        full = data.trim(feed)
        batch = next(iter(full.values())).shape[0]
        shard = data.trim(data.rows(full, np.arange(self.world.rank, batch, self.world.size)))
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * self.config.lr_factor(fraction)
        entry, aux, mask = self.student.inputs(shard)
        tokens = self.world.total(float(mask.sum()))
        teacher = self.teacher.run(shard)
        if not self.layer_loss:
            teacher = TeacherOutput([], teacher.end)
        out = self.student.run(entry, aux, mask, self.module)
        if not self.layer_loss:
            out = dataclasses.replace(out, layers=[])
        terms = (self.student.loss or distill_loss)(out, teacher, mask, self.config, self.scales,
                                                    tokens=tokens, sequences=float(batch))
        l1 = activation_l1(self.student.mirror, tokens) if self.config.activation_l1 else None
        if l1 is not None:  # DSTI: sparser ReLU experts (recovery.moe)
            terms.total = terms.total + self.config.activation_l1 * l1
            terms.activation = self.config.activation_l1 * float(l1.detach())
        self.optimizer.zero_grad(set_to_none=True)
        (terms.total * self.world.size).backward()  # DDP averages gradients over ranks
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.student.mirror.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return (self.world.total(terms.distill), self.world.total(terms.router), batch,
                int(tokens))

    def evaluate(self, holdout: Holdout) -> Evaluation:
        """Measures pooled and per-token cosine to the teacher on the holdout."""
        pooled_cos, token_cos = [], []
        self.student.mirror.eval()  # no router regression while measuring
        with torch.no_grad():
            for (entry, aux, mask), end in zip(holdout.inputs, holdout.teacher_end, strict=True):
                got = self.student.run(entry, aux, mask).end
                pooled_cos.append(F.cosine_similarity(pooled(got, mask), pooled(end, mask), -1))
                if got.ndim == 3:
                    real = mask.bool()
                    token_cos.append(F.cosine_similarity(got[real], end[real], dim=-1))
        self.student.mirror.train()
        p = torch.cat(pooled_cos).double().numpy()
        t = torch.cat(token_cos).double().numpy() if token_cos else p
        return Evaluation(float(p.mean()), float(np.percentile(p, 5)), float(t.mean()))

    def fit(self, batches: Iterator[Feed], holdout: Holdout, *, deadline: float | None,
            max_steps: int | None, progress: Any = None) -> FitResult:
        """Trains until the step budget, the deadline or early stopping; keeps the best."""
        t0 = time.perf_counter()
        before = best = self.evaluate(holdout)
        reserve = 2.0 * (time.perf_counter() - t0) + 2.0  # final evaluation and write-back
        best_state, best_step = self.student.snapshot(), 0
        losses: list[float] = []
        router_losses: list[float] = []
        step = sequences = tokens = stale = 0
        stopped, step_s = "", 0.0
        while True:
            now = time.perf_counter()
            fraction, stop = self._position(step, now, t0, deadline, reserve, step_s, max_steps)
            stop = stop or ("early" if stale >= self.config.patience > 0 else "")
            stop, fraction = self.world.agree(stop, fraction)
            if stop:
                stopped = stop
                break
            loss, router, n_seq, n_tok = self.train_step(next(batches), fraction)
            step += 1
            sequences, tokens = sequences + n_seq, tokens + n_tok
            losses.append(loss)
            router_losses.append(router)
            step_s = time.perf_counter() - now if step == 1 else 0.9 * step_s + 0.1 * (
                time.perf_counter() - now)
            evaluation = None
            if step % self.config.eval_every == 0:
                evaluation = self.evaluate(holdout)
                if evaluation.pooled_cosine > best.pooled_cosine:
                    best, best_state, best_step, stale = (evaluation, self.student.snapshot(),
                                                          step, 0)
                else:
                    stale += 1
            if progress is not None and self.world.rank == 0:
                progress.step(step, loss, time.perf_counter() - t0, evaluation)
        if step % self.config.eval_every:
            final = self.evaluate(holdout)
            if final.pooled_cosine > best.pooled_cosine:
                best, best_state, best_step = final, self.student.snapshot(), step
        return FitResult(step, sequences, tokens, time.perf_counter() - t0, stopped, best_step,
                         before, best, best_state, losses, router_losses)

    def _position(self, step: int, now: float, t0: float, deadline: float | None,
                  reserve: float, step_s: float, max_steps: int | None) -> tuple[float, str]:
        """Returns (share of the budget used, stop reason or "")."""
        fraction, stop = 0.0, ""
        if max_steps is not None:
            fraction = step / max_steps
            stop = "steps" if step >= max_steps else ""
        if deadline is not None:
            usable = max(deadline - reserve - t0, 1e-9)
            fraction = max(fraction, (now - t0) / usable)
            if not stop and now + step_s + reserve > deadline:
                stop = "budget"
        return fraction, stop
