"""The up-front analysis: what compile cannot rewrite is found before any fitting, and every
refusal names the construct (op type and node)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from planer.compiler.driver.cli import main
from planer.compiler.driver.pipeline import compile_plan, read_model
from planer.compiler.errors import UnsupportedModelError
from planer.compiler.plan import parse_plan
from planer.compiler.support import analyze, prepare, require_supported
from planer.fixtures.build import fixture_path
from planer.fixtures.families import _perturb_constant_parameters as perturb_constant_parameters
from planer.fixtures.fused import fused_bert_path
from planer.passes.prune_fit import Importance, allocate

TINY = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
        "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 130}


def export_tiny(model_type: str, path: Path, **extra: object) -> tuple[Any, Path]:
    """Exports a tiny random transformers model (input_ids, attention_mask) with TorchScript.

    Returns the eval-mode torch wrapper (same weights) and the ONNX path.
    """
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type, **TINY, **extra)
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    perturb_constant_parameters(model)  # as the fixtures do: no merged zero biases

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):  # noqa: D102
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    args = (torch.randint(3, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.long))
    axes = {n: {0: "b", 1: "s"} for n in ("input_ids", "attention_mask", "last_hidden_state")}
    wrapper = Wrapper().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], dynamic_axes=axes)
    return wrapper, path


@pytest.fixture(scope="module")
def bias_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fused-Attention BERT with a caller-fed attention_bias [b, h, s, s] per layer."""
    proto = onnx.load(str(fused_bert_path("attention")))
    proto.graph.input.append(helper.make_tensor_value_info(
        "attention_bias", TensorProto.FLOAT, ["b", "h", "s", "s"]))
    for node in proto.graph.node:
        if node.op_type == "Attention":
            node.input[:] = [*node.input[:4], "", "attention_bias"]
    model = ir.serde.deserialize_model(proto)
    prepare(model)
    path = tmp_path_factory.mktemp("bias") / "model.onnx"
    ir.save(model, str(path))
    return path


def test_unplaceable_per_head_term_stops_head_pruning_only(
        bias_input: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, spec = read_model(bias_input)
    support = analyze(spec)
    assert not support.supported
    assert [la.verdict for la in support.layers] == ["FFN only", "FFN only"]
    reason = support.layers[0].heads
    assert reason is not None and "per-head term from graph input 'attention_bias'" in reason
    assert main(["inspect", str(bias_input), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["supported"] is False and len(data["unsupported"]) == 2
    assert [(la["supported"], la["heads_prunable"]) for la in data["layers"]] == \
        [(False, False)] * 2


def test_plan_pruning_unsliceable_heads_is_refused_before_fitting(bias_input: Path) -> None:
    _, spec = read_model(bias_input)
    prune_heads = parse_plan({"layers": [{"heads": 2}, {}]}, spec)
    with pytest.raises(UnsupportedModelError) as info:
        require_supported(spec, prune_heads)
    message = str(info.value)
    assert "layer 0 to 2 of 4 heads" in message and "graph input 'attention_bias'" in message
    assert "keep its heads at 4" in message
    require_supported(spec, parse_plan({"layers": [{"ffn": 64}, {"ffn": 32}]}, spec))


def test_allocation_keeps_unsliceable_heads_and_prunes_channels(bias_input: Path) -> None:
    _, spec = read_model(bias_input)
    scores = Importance(heads=[np.full(4, 1e-9)] * 2, channels=[np.ones(128)] * 2)
    counts = allocate(spec, scores, 0.8, batch=1, seq_len=64)
    assert [h for h, _ in counts] == [4, 4]
    assert sum(f for _, f in counts) < 256


# Rotary attention (RoFormer) is read and pruned now; the rotary forms still refused
# (partial rotary) are tested in tests/test_rotary.py.


def test_float16_weights_are_refused_by_node(tmp_path: Path) -> None:
    _, spec = read_model(fixture_path("bert", "torchscript"))
    q = spec.layers[1].attention.q
    q.weight.const_value = ir.tensor(q.w().astype(np.float16))
    support = analyze(spec)
    assert support.layers[0].supported and support.layers[1].verdict == "no"
    with pytest.raises(UnsupportedModelError) as info:
        require_supported(spec)
    message = str(info.value)
    assert message.startswith("layer 1: the weights of ai.onnx.MatMul node '")
    assert "float16" in message and "float32" in message


def test_every_plain_fixture_is_supported() -> None:
    for family in ("bert", "gpt2", "vit", "albert"):
        _, spec = read_model(fixture_path(family, "dynamo"))
        assert analyze(spec).supported, family


def test_layers_sharing_one_bias_prune_to_different_widths(tmp_path: Path) -> None:
    # ALBERT's layers read one FFN bias initializer; each layer slices its own copy.
    plan = {"layers": [{"ffn": 64}, {"ffn": 32}]}
    result = compile_plan(fixture_path("albert", "dynamo"), tmp_path / "out", plan_data=plan)
    assert [la["ffn"]["after"] for la in result.report["layers"]] == [64, 32]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_relative_position_refusal_names_the_node(exporter: str) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        read_model(fixture_path("deberta", exporter))
    message = str(info.value)
    assert "DeBERTa-style relative-position attention" in message
    assert "hidden states at Add node '" in message
