r"""Recovery under torch DistributedDataParallel: more processes, the same training.

    torchrun --nproc-per-node N -m planer.recovery.ddp ORIGINAL COMPILED -o OUT.onnx \
        --calibration FILE [--tokenizer DIR] [--texts FILE ...] (--steps N | --budget SECONDS)

    every rank: same calibration, same seeded global batch stream
      rank r takes rows r, r+N, r+2N, ... of each global batch ─ Mirror wrapped in DDP
      loss normalised by the *global* token / sequence counts, times N, so DDP's gradient
      mean equals the one-process gradient of the whole batch
      stop decision and schedule position: rank 0's, broadcast every step
    rank 0 writes the trained weights back and saves OUT.onnx (temporary file, renamed)

With the same global batch and seed, N processes end at the same weights as one
(`tests/test_recovery_ddp.py`, gloo, 2 processes), up to float summation order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from planer.compiler.argtypes import positive_int
from planer.compiler.calibration import build_calibration, model_input_infos, read_texts
from planer.compiler.loading import load_model
from planer.recovery.distill import (
    RecoveryError,
    RecoveryReport,
    allowed_diff,
    check_inputs,
    training_batches,
)
from planer.recovery.train import (
    STOPS,
    Holdout,
    RecoveryConfig,
    Trainer,
    World,
    build_student,
    load_teacher,
)


class DistWorld(World):
    """The process group: rank 0 decides when to stop and where the schedule is."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()

    def agree(self, stop: str, fraction: float) -> tuple[str, float]:
        state = torch.tensor([STOPS.index(stop), fraction], dtype=torch.float64)
        dist.broadcast(state, src=0)
        return STOPS[int(state[0])], float(state[1])

    def total(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor[0])


@dataclasses.dataclass(frozen=True)
class Job:
    """What every rank needs to train (plain data, so it pickles to spawned processes)."""

    original: Path
    compiled: Path
    output: Path
    calibration: Path
    tokenizer: Path | None = None
    texts: tuple[Path, ...] = ()
    budget_s: float | None = None
    max_steps: int | None = None
    seed: int = 0
    seq_len: int | None = 128
    max_samples: int = 256
    config: RecoveryConfig = RecoveryConfig()


def run(job: Job) -> RecoveryReport | None:
    """Trains on this rank of an initialised process group; rank 0 writes and reports."""
    started = time.perf_counter()
    world = DistWorld()
    model = load_model(job.compiled)
    ir.external_data.load_to_model(model)
    calib = build_calibration(job.calibration, model_input_infos(model), tokenizer=job.tokenizer,
                              seq_len=job.seq_len, max_samples=job.max_samples, seed=job.seed)
    texts = [t for path in job.texts for t in read_texts(path)] or None
    check_inputs(calib, job.budget_s, job.max_steps, texts, job.tokenizer)
    student = build_student(model, threads=job.config.threads)
    teacher = load_teacher(job.original, threads=job.config.threads)
    # The buffers are graph constants, equal on every rank: no need to sync them per step.
    module = DistributedDataParallel(student.mirror, forward_sync_buffers=False)
    trainer = Trainer(student, teacher, job.config, seed=job.seed, world=world, module=module)
    holdout = Holdout.build(student, trainer.teacher_run, calib.holdout)
    mirror_diff, scale = student.check_scaled(model, holdout.feeds[0])
    if mirror_diff > allowed_diff(scale):
        raise RecoveryError(f"the torch mirror differs from the compiled model by "
                            f"{mirror_diff:.2e}; not trained.")
    trainer.set_scales(holdout)
    batches = training_batches(model, calib, job.config, job.seed, texts, job.tokenizer)
    deadline = started + job.budget_s if job.budget_s else None
    result = trainer.fit(batches, holdout, deadline=deadline, max_steps=job.max_steps)
    if world.rank != 0:
        return None
    student.restore(result.best_state)
    written = student.write_back(model)
    _save(model, job.output)
    return RecoveryReport(
        steps=result.steps, sequences=result.sequences, tokens=result.tokens,
        wall_s=round(time.perf_counter() - started, 2), train_s=round(result.train_s, 2),
        stopped=result.stopped, best_step=result.best_step, loss=result.loss_summary(),
        fidelity_before=result.before.to_dict(), fidelity_after=result.best.to_dict(),
        mirror_max_abs_diff=mirror_diff, written_max_abs_diff=student.check(
            model, holdout.feeds[0]),
        trained_tensors=len(written), trained_params=student.trained_params(),
        layer_loss=trainer.layer_loss, parts=student.parts(),
        config=dataclasses.asdict(job.config), world_size=world.size, written=written,
    )


def _save(model: ir.Model, path: Path) -> None:
    """Writes `model` to a temporary file beside `path`, then renames it into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    ir.save(model, temporary)
    temporary.replace(path)


def spawn_worker(rank: int, world_size: int, port: int, job: Job) -> None:
    """Entry point for `torch.multiprocessing.spawn`: joins a local gloo group and trains."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        report = run(job)
        if report is not None:
            job.output.with_suffix(".json").write_text(json.dumps(report.to_dict(), indent=1))
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one torchrun rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment)."""
    args = _parser().parse_args(argv)
    if args.steps is None and args.budget is None:
        print("error: give --steps or --budget", file=sys.stderr)
        return 2
    job = Job(args.original, args.compiled, args.output, args.calibration, args.tokenizer,
              tuple(args.texts), args.budget, args.steps, args.seed,
              config=RecoveryConfig(lr=args.lr, batch_size=args.batch_size,
                                    threads=args.threads))
    dist.init_process_group("gloo")
    try:
        report = run(job)
        if report is not None:
            args.output.with_suffix(".json").write_text(json.dumps(report.to_dict(), indent=1))
    finally:
        dist.destroy_process_group()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m planer.recovery.ddp",
                                     description="Recovery training under torchrun (gloo).")
    parser.add_argument("original", type=Path)
    parser.add_argument("compiled", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--texts", type=Path, nargs="*", default=[])
    parser.add_argument("--steps", type=positive_int)
    parser.add_argument("--budget", type=float, help="wall-clock seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=RecoveryConfig.lr)
    parser.add_argument("--batch-size", type=positive_int, default=RecoveryConfig.batch_size)
    parser.add_argument("--threads", type=positive_int, default=1)
    return parser


if __name__ == "__main__":
    sys.exit(main())
