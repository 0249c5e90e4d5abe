"""Per-head score terms (MPNet's relative-position bias) are sliced with the heads: the
neutral plan is exact and a pruned plan matches an independently sliced torch model."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from planer.compiler.driver.cli import main
from planer.compiler.driver.pipeline import compile_plan
from tests.conftest import run_ort
from tests.test_support import export_tiny


@pytest.fixture(scope="module")
def mpnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    return export_tiny("mpnet", tmp_path_factory.mktemp("mpnet") / "model.onnx")


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    mask = np.ones((2, 20), np.int64)
    mask[1, 14:] = 0
    return {"input_ids": rng.integers(3, 1000, (2, 20)).astype(np.int64), "attention_mask": mask}


def _sliced_torch(wrapper: Any, kept: list[list[int]]) -> Any:
    """Prunes heads in a copy of the torch MPNet by hand, the bias rows included."""
    import torch

    model = copy.deepcopy(wrapper)
    for layer, heads in zip(model.model.encoder.layer, kept, strict=True):
        attn = layer.attention.attn
        d = attn.attention_head_size
        cols = torch.tensor([h * d + i for h in heads for i in range(d)])
        for name in ("q", "k", "v"):
            old = getattr(attn, name)
            new = torch.nn.Linear(old.in_features, len(cols))
            new.weight.data, new.bias.data = old.weight.data[cols], old.bias.data[cols]
            setattr(attn, name, new)
        o = torch.nn.Linear(len(cols), attn.o.out_features)
        o.weight.data, o.bias.data = attn.o.weight.data[:, cols], attn.o.bias.data
        attn.o, attn.num_attention_heads, attn.all_head_size = o, len(heads), len(cols)
        index = torch.tensor(heads)

        def keep_rows(_module: Any, args: tuple, index: Any = index) -> tuple:
            hidden, mask, bias = args[:3]
            return (hidden, mask, bias[:, index], *args[3:])

        attn.register_forward_pre_hook(keep_rows)
    return model


def test_mpnet_reads_as_fully_supported(mpnet: tuple[Any, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(mpnet[1]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["supported"] is True and [la["heads"] for la in data["layers"]] == [4, 4]


def test_neutral_plan_is_exact(mpnet: tuple[Any, Path], tmp_path: Path) -> None:
    result = compile_plan(mpnet[1], tmp_path / "out", ort_kernels="on")
    feeds = _feeds()
    np.testing.assert_allclose(run_ort(result.model_path, feeds)[0], run_ort(mpnet[1], feeds)[0],
                               rtol=0, atol=1e-4)


def test_pruned_heads_match_a_sliced_torch_model(mpnet: tuple[Any, Path],
                                                 tmp_path: Path) -> None:
    import torch

    wrapper, path = mpnet
    plan = {"layers": [{"heads": 2}, {"heads": 3}]}
    result = compile_plan(path, tmp_path / "out", plan_data=plan)
    kept = [la["heads"]["kept"] for la in result.report["layers"]]
    assert [len(k) for k in kept] == [2, 3]
    feeds = _feeds()
    with torch.no_grad():
        want = _sliced_torch(wrapper, kept)(*(torch.from_numpy(feeds[n])
                                              for n in ("input_ids", "attention_mask")))
    np.testing.assert_allclose(run_ort(result.model_path, feeds)[0], want.numpy(), rtol=0,
                               atol=1e-4)


def test_half_flops_prunes_heads_and_verifies(mpnet: tuple[Any, Path], tmp_path: Path) -> None:
    result = compile_plan(mpnet[1], tmp_path / "out", target_flops=0.5)
    assert result.report["flops_ratio"] <= 0.5
    assert any(la["heads"]["after"] < 4 for la in result.report["layers"])
