"""Two gloo processes train the same weights as one, given the same global batch and seed."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
import torch.multiprocessing as mp

from planer.compiler.calibration import build_calibration, model_input_infos
from planer.compiler.loading import load_model
from planer.fixtures.build import fixture_path
from planer.recovery.ddp import Job, spawn_worker
from planer.recovery.distill import recover
from planer.recovery.train import RecoveryConfig
from tests.test_recovery import noisy_compiled

CONFIG = RecoveryConfig(lr=1e-3, batch_size=16, eval_every=5, threads=1)
STEPS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_match_one(tmp_path: Path, word_calibration: tuple[Path, Path]) -> None:
    torch.set_num_threads(1)
    text, vocab = word_calibration
    src = fixture_path("bert", "dynamo")
    compiled = noisy_compiled(tmp_path, text, vocab)  # a start that training improves
    single = load_model(compiled)
    calib = build_calibration(text, model_input_infos(single), tokenizer=vocab, seq_len=32)
    report = recover(src, single, calib, budget_s=None, max_steps=STEPS, config=CONFIG)
    assert report.best_step == STEPS  # the trained weights are the ones written

    job = Job(src, compiled, tmp_path / "ddp.onnx", text, vocab, max_steps=STEPS, seq_len=32,
              config=CONFIG)
    mp.spawn(spawn_worker, args=(2, _free_port(), job), nprocs=2, join=True)
    ddp_report = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp_report["world_size"] == 2 and ddp_report["steps"] == STEPS
    assert ddp_report["sequences"] == report.sequences

    distributed, start = load_model(tmp_path / "ddp.onnx"), load_model(compiled)
    ir.external_data.load_to_model(start)
    moved = diff = 0.0
    for name in report.written:
        a = single.graph.initializers[name].const_value.numpy()  # type: ignore[union-attr]
        b = distributed.graph.initializers[name].const_value.numpy()  # type: ignore[union-attr]
        o = start.graph.initializers[name].const_value.numpy()  # type: ignore[union-attr]
        diff, moved = max(diff, float(np.abs(a - b).max())), max(moved, float(np.abs(a - o).max()))
    # Measured: the weights move by ~6e-3 and the two runs differ by summation order
    # only: < 1e-6 on an Intel Xeon, 1.9e-5 on an AMD EPYC (both AVX-512); with both ranks
    # reading the same shard they differed by 8.5e-3, which this bound still catches.
    assert moved > 1e-3
    assert diff < 1e-4
