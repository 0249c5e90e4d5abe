"""Rotary position embeddings (compiler.rotary): the finder reads them, head pruning keeps
each kept head's rotary pairs whole. The neutral plan is exact, and a pruned plan matches
an independently sliced torch RoFormer, in RoFormer's interleaved form (both exporters)
and in variants exported here: rotate-half (Llama, ModernBERT), rotary V, cos/sin with one
row per head (gathered with the heads), partial rotary (GPT-NeoX: the first 8 of 16
dims rotate) and rotate-half on [B, S, H, d] between head Transposes (ORT's optimizer
writes K so on ModernBERT). What stays refused (pairs across heads) names the node.

ModernBERT (packed Q/K/V, fused GLU, rotate-half) is a fixture family of its own:
tests/test_modernbert.py.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from planer.compiler.driver.cli import main
from planer.compiler.driver.pipeline import compile_plan, read_model
from planer.compiler.errors import PreconditionError, UnsupportedModelError
from planer.fixtures.build import build_torch_model, fixture_path
from tests.conftest import masked_token_feeds, run_ort, run_torch_wrapper

torch = pytest.importorskip("torch")

HEADS, HEAD_SIZE = 4, 16
Rotate = Callable[..., Any]




def _attentions(wrapper: Any) -> list[Any]:
    return [layer.attention for layer in wrapper.model.encoder.layer]


def _sliced_torch(wrapper: Any, kept: list[list[int]], rotate: Callable | None = None) -> Any:
    """Prunes heads in a copy of the torch RoFormer by hand: Q/K/V rows, O columns."""
    model = copy.deepcopy(wrapper)
    for attention, heads in zip(_attentions(model), kept, strict=True):
        attn = attention.self
        cols = torch.tensor([h * HEAD_SIZE + i for h in heads for i in range(HEAD_SIZE)])
        for name in ("query", "key", "value"):
            old = getattr(attn, name)
            new = torch.nn.Linear(old.in_features, len(cols))
            new.weight.data, new.bias.data = old.weight.data[cols], old.bias.data[cols]
            setattr(attn, name, new)
        dense = attention.output.dense
        o = torch.nn.Linear(len(cols), dense.out_features)
        o.weight.data, o.bias.data = dense.weight.data[:, cols], dense.bias.data
        attention.output.dense = o
        attn.num_attention_heads, attn.all_head_size = len(heads), len(cols)
        if rotate is not None:
            attn.apply_rotary_position_embeddings = rotate(torch.tensor(heads))
    return model


def _export(wrapper: Any, path: Path) -> Path:
    """Exports a RoFormer variant with the TorchScript exporter, as the fixtures do."""
    from planer.fixtures.build import _export as export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(wrapper, ("input_ids", "attention_mask"), "torchscript", path)
    return path


def _variant(rotate: Rotate | None, path: Path, **config: Any) -> tuple[Any, Path]:
    """Builds the roformer fixture's torch model with another rotary, and exports it."""
    if config:
        from transformers import AutoConfig, AutoModel

        from planer.fixtures.families import (
            FAMILY_SPECS,
            TEXT_INPUTS,
            _export_wrapper,
            _perturb_constant_parameters,
        )

        spec = FAMILY_SPECS["roformer"]
        torch.manual_seed(0)
        model = AutoModel.from_config(
            AutoConfig.for_model(spec.model_type, **spec.config, **config)).eval()
        _perturb_constant_parameters(model)
        wrapper = _export_wrapper(model, TEXT_INPUTS, {})
    else:
        wrapper = build_torch_model("roformer")
    if rotate is not None:
        for attention in _attentions(wrapper):
            attention.self.apply_rotary_position_embeddings = rotate(torch.arange(HEADS))
    return wrapper, _export(wrapper, path)


# ------------------------------------------------------------- rotary variants (torch side)


def _rotate_half(x: Any) -> Any:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _half_angles(sinusoidal_pos: Any) -> tuple[Any, Any]:
    sin, cos = sinusoidal_pos.chunk(2, dim=-1)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def half_style(_heads: Any) -> Rotate:
    """Llama/ModernBERT's rotate-half on RoFormer's angles."""

    def apply(sinusoidal_pos: Any, q: Any, k: Any) -> tuple[Any, Any]:
        cos, sin = _half_angles(sinusoidal_pos)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    return apply


def per_head(heads: Any) -> Rotate:
    """Rotate-half with cos/sin scaled per head: [1, H, S, d] terms the heads' rows index."""
    weights = 1.0 + 0.25 * torch.arange(HEADS, dtype=torch.float32)

    def apply(sinusoidal_pos: Any, q: Any, k: Any) -> tuple[Any, Any]:
        cos, sin = _half_angles(sinusoidal_pos)
        rows = weights[heads].view(1, -1, 1, 1)
        cos, sin = cos * rows, sin * rows
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    return apply


def other_layout(_heads: Any) -> Rotate:
    """Rotate-half applied to [B, S, H, d] (heads back on axis 2), then transposed back.

    Each head still rotates its own pairs (cos/sin transposed alike), so this is read as
    the rotary on [B, H, S, d] (compiler.rotary.heads_first; ORT's optimizer writes K so).
    """

    def apply(sinusoidal_pos: Any, q: Any, k: Any) -> tuple[Any, Any]:
        cos, sin = (t.transpose(1, 2) for t in _half_angles(sinusoidal_pos))

        def one(x: Any) -> Any:
            y = x.transpose(1, 2)
            return (y * cos + _rotate_half(y) * sin).transpose(1, 2)

        return one(q), one(k)

    return apply


def merged_heads(_heads: Any) -> Rotate:
    """Rotate-half over the whole merged width [B, S, H·d]: pairs that cross heads."""

    def apply(sinusoidal_pos: Any, q: Any, k: Any) -> tuple[Any, Any]:
        cos, sin = (t[0, 0].repeat(1, HEADS) for t in _half_angles(sinusoidal_pos))

        def one(x: Any) -> Any:
            b, h, s, d = x.shape
            y = x.transpose(1, 2).reshape(b, s, h * d)
            return (y * cos + _rotate_half(y) * sin).reshape(b, s, h, d).transpose(1, 2)

        return one(q), one(k)

    return apply


def partial(_heads: Any) -> Rotate:
    """GPT-NeoX-style partial rotary: the first 8 of 16 dims rotate, the rest pass."""

    def apply(sinusoidal_pos: Any, q: Any, k: Any) -> tuple[Any, Any]:
        cos, sin = _half_angles(sinusoidal_pos[..., ::2])

        def one(x: Any) -> Any:
            turned, kept = x[..., :8], x[..., 8:]
            return torch.cat((turned * cos + _rotate_half(turned) * sin, kept), dim=-1)

        return one(q), one(k)

    return apply


# ------------------------------------------------------------- the family fixture


@pytest.fixture(scope="module")
def roformer_torch() -> Any:
    return build_torch_model("roformer")


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_inspect_reads_rotary_layers(exporter: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(fixture_path("roformer", exporter)), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["supported"] is True
    assert [(la["heads"], la["head_size"], la["ffn"], la["hidden"], la["rotary"],
             la["supported"]) for la in data["layers"]] == \
        [(HEADS, HEAD_SIZE, 128, 64, "interleaved", True)] * 2


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_neutral_plan_is_exact(exporter: str, tmp_path: Path) -> None:
    path = fixture_path("roformer", exporter)
    result = compile_plan(path, tmp_path / "out", ort_kernels="on")
    feeds = masked_token_feeds()
    np.testing.assert_allclose(run_ort(result.model_path, feeds)[0], run_ort(path, feeds)[0],
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_pruned_heads_match_a_sliced_torch_model(exporter: str, roformer_torch: Any,
                                                 tmp_path: Path) -> None:
    plan = {"layers": [{"heads": 2}, {"heads": 3}]}
    result = compile_plan(fixture_path("roformer", exporter), tmp_path / "out", plan_data=plan)
    kept = [la["heads"]["kept"] for la in result.report["layers"]]
    assert [len(k) for k in kept] == [2, 3]
    feeds = masked_token_feeds()
    want = run_torch_wrapper(_sliced_torch(roformer_torch, kept), feeds)
    np.testing.assert_allclose(run_ort(result.model_path, feeds)[0], want, rtol=0, atol=1e-4)
    # The compiled model reads back as rotary attention (planer's own spelling) and
    # recompiles exactly.
    _, spec = read_model(result.model_path)
    assert [(la.attention.heads, sorted(la.attention.rotary)) for la in spec.layers] == \
        [(2, ["k", "q"]), (3, ["k", "q"])]
    again = compile_plan(result.model_path, tmp_path / "again", ort_kernels="on")
    np.testing.assert_allclose(run_ort(again.model_path, feeds)[0], want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_ort_optimized_form_is_read_and_pruned(exporter: str, roformer_torch: Any,
                                               tmp_path: Path) -> None:
    # ORT's optimizer fuses the norms and, on the dynamo export, moves K's head Transpose
    # past its Mul by cos (compiler.rotary._plain_terms reads that form).
    from planer.fixtures.fused import optimized_path

    path = optimized_path("roformer", exporter)
    _, spec = read_model(path)
    assert [(la.attention.heads, sorted(la.attention.rotary)) for la in spec.layers] == \
        [(HEADS, ["k", "q"])] * 2
    feeds = masked_token_feeds()
    neutral = compile_plan(path, tmp_path / "neutral", ort_kernels="on")
    np.testing.assert_allclose(run_ort(neutral.model_path, feeds)[0], run_ort(path, feeds)[0],
                               rtol=0, atol=1e-4)
    pruned = compile_plan(path, tmp_path / "pruned",
                          plan_data={"layers": [{"heads": 3}, {"heads": 2}]})
    kept = [la["heads"]["kept"] for la in pruned.report["layers"]]
    want = run_torch_wrapper(_sliced_torch(roformer_torch, kept), feeds)
    np.testing.assert_allclose(run_ort(pruned.model_path, feeds)[0], want, rtol=0, atol=1e-4)


def test_half_flops_prunes_heads_and_verifies(tmp_path: Path) -> None:
    result = compile_plan(fixture_path("roformer", "dynamo"), tmp_path / "out", target_flops=0.5)
    report = result.report
    assert report["flops_ratio"] <= 0.5
    assert report["verification"]["min_cosine"] > 0.5  # written only after ORT ran it
    assert any(la["heads"]["after"] < HEADS for la in report["layers"])


def test_token_skimming_refuses_rotary_layers(tmp_path: Path) -> None:
    plan = {"layers": [{}, {"skim_keep": 0.5}]}
    with pytest.raises(PreconditionError, match="rotary position embeddings"):
        compile_plan(fixture_path("roformer", "dynamo"), tmp_path / "out", plan_data=plan)


# ------------------------------------------------------------- variants exported here


@pytest.mark.parametrize(("rotate", "config", "roles"), [
    (half_style, {}, ["k", "q"]),
    (per_head, {}, ["k", "q"]),
    (None, {"rotary_value": True}, ["k", "q", "v"]),
    (partial, {}, ["k", "q"]),
    (other_layout, {}, ["k", "q"]),
], ids=["rotate-half", "per-head-cos-sin", "rotary-value", "partial-rotary", "seq-major"])
def test_variant_neutral_exact_and_pruned_matches_torch(
        rotate: Rotate | None, config: dict[str, Any], roles: list[str], tmp_path: Path) -> None:
    wrapper, path = _variant(rotate, tmp_path / "model.onnx", **config)
    _, spec = read_model(path)
    assert [sorted(la.attention.rotary) for la in spec.layers] == [roles] * 2
    feeds = masked_token_feeds()
    neutral = compile_plan(path, tmp_path / "neutral", ort_kernels="on")
    np.testing.assert_allclose(run_ort(neutral.model_path, feeds)[0], run_ort(path, feeds)[0],
                               rtol=0, atol=1e-4)
    pruned = compile_plan(path, tmp_path / "pruned",
                          plan_data={"layers": [{"heads": 1}, {"heads": 3}]})
    kept = [la["heads"]["kept"] for la in pruned.report["layers"]]
    want = run_torch_wrapper(_sliced_torch(wrapper, kept, rotate), feeds)
    np.testing.assert_allclose(run_ort(pruned.model_path, feeds)[0], want, rtol=0, atol=1e-4)
    _, back = read_model(pruned.model_path)  # planer's own spelling reads back the same
    assert [(sorted(la.attention.rotary), {r.partial for r in la.attention.rotary.values()})
            for la in back.layers] == [(roles, {r.partial for r in
                                                 spec.layers[0].attention.rotary.values()})] * 2


def test_rotary_in_another_layout_is_refused_by_node(tmp_path: Path) -> None:
    _, path = _variant(merged_heads, tmp_path / "model.onnx")
    with pytest.raises(UnsupportedModelError) as info:
        read_model(path)
    message = str(info.value)
    # Pairs across heads on [B, S, H·d]: the rotation's Add is named where Q was expected.
    assert "Softmax node '" in message and "Add node '" in message
    assert "rotary position embeddings rotate Q/K pairs there in a form planer does not " \
        "read" in message


def test_pruned_rotary_attention_golden(golden: Callable[[str, str], None]) -> None:
    # What head pruning emits around the rotation (interleaved pairs, kept heads 0 and 2).
    from planer.passes.head_pruning import HeadPruningConfig, apply_head_pruning
    from tests.goldens import structure

    model, spec = read_model(fixture_path("roformer", "dynamo"))
    assert apply_head_pruning(model, spec, HeadPruningConfig(keep={0: (0, 2)})) == 1
    golden("head_pruning_roformer.txt", structure(model))
