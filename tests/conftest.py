"""Shared pytest fixtures: models (built and cached by planer.fixtures), goldens, ORT runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-goldens", action="store_true",
                     help="rewrite tests/golden/* from the current output")


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))


@pytest.fixture(scope="session")
def minilm_dynamo() -> Path:
    from planer.fixtures.build import minilm_path

    return minilm_path("dynamo")


@pytest.fixture(scope="session")
def minilm_torchscript() -> Path:
    from planer.fixtures.build import minilm_path

    return minilm_path("torchscript")


def run_ort(path: Path | str, feeds: dict[str, np.ndarray], *, optimize: bool = False,
            threads: int = 1) -> list[np.ndarray]:
    """Runs a model in ORT; optimizations are off by default so ORT's fusions cannot hide a
    bad rewrite."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def text_feeds(*, batch: int, seq_len: int, vocab: int, seed: int = 0,
               pad_last: int = 0) -> dict[str, np.ndarray]:
    """Seeded token feeds; the last row gets `pad_last` padding positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(batch, seq_len)).astype(np.int64)
    mask = np.ones((batch, seq_len), dtype=np.int64)
    if pad_last:
        mask[-1, -pad_last:] = 0
        ids[-1, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq_len), dtype=np.int64)}


def image_feeds(*, batch: int, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}
