"""INT8 through onnxruntime.quantization: neutral config exact, the chosen blocks only, the
result equal to ORT's own quantizer on the same nodes, provenance and names, plan field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxruntime.quantization import quantize_dynamic

from planer.compiler.calibration import CalibrationSet, build_calibration, model_input_infos
from planer.compiler.driver.pipeline import read_model
from planer.compiler.driver.prune import magnitude_selection
from planer.compiler.errors import BadInputError, PreconditionError
from planer.compiler.names import PROVENANCE_BLOCK, PROVENANCE_PASS, PassName
from planer.compiler.plan import Int8Plan, LayerPlan, Plan, parse_plan
from planer.compiler.spec import ModelSpec
from planer.compiler.targets import check_ops
from planer.passes.head_pruning import HeadPruningConfig, apply_head_pruning
from planer.passes.quantize import QuantizeConfig, apply_int8, apply_quantize
from tests.conftest import run_ort, text_feeds


def _fixture() -> Path:
    from planer.fixtures.build import fixture_path

    return fixture_path("bert", "dynamo")


def _read() -> tuple[ir.Model, ModelSpec]:
    model, spec = read_model(_fixture())
    ir.external_data.load_to_model(model)
    return model, spec


def _save(model: ir.Model, path: Path) -> Path:
    ir.save(model, path)
    return path


def _feeds(spec: ModelSpec) -> dict[str, np.ndarray]:
    return text_feeds(batch=2, seq_len=16, vocab=spec.vocab_size, seed=3, pad_last=4)


def _calib(model: ir.Model, spec: ModelSpec) -> CalibrationSet:
    return build_calibration(None, model_input_infos(model), vocab_size=spec.vocab_size,
                             seq_len=16, max_samples=32, seed=0)


def test_neutral_config_leaves_the_model_unchanged() -> None:
    model, spec = _read()
    before = ir.serde.serialize_model(model).SerializeToString()
    assert apply_quantize(model, spec, QuantizeConfig({})) == 0
    assert apply_int8(model, spec, Plan.neutral(spec), None) == {}
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_dynamic_attention_equals_ort_quantizer_on_the_same_nodes(tmp_path: Path) -> None:
    model, spec = _read()
    float_path = _save(model, tmp_path / "float.onnx")
    attn = spec.layers[0].attention
    names = [lin.matmul.name for lin in (attn.q, attn.k, attn.v, attn.o)]
    untouched = {lin.matmul.name for la in spec.layers for lin in la.projections()} - set(names)
    # The expected model: ORT's quantizer called directly with the nodes named by hand.
    expected = tmp_path / "expected.onnx"
    quantize_dynamic(float_path, expected, op_types_to_quantize=["MatMul"],
                     nodes_to_quantize=names)
    assert apply_quantize(model, spec, QuantizeConfig({0: Int8Plan("attn", "dynamic")})) == 1
    got = _save(model, tmp_path / "got.onnx")
    feeds = _feeds(spec)
    for want, have in zip(run_ort(expected, feeds), run_ort(got, feeds), strict=True):
        np.testing.assert_array_equal(have, want)
    ops = {n.name: n.op_type for n in model.graph}
    assert untouched <= set(ops)  # every other projection is still the float MatMul
    assert not set(names) & set(ops)
    assert sum(op == "MatMulInteger" for op in ops.values()) == 4


def test_quantized_nodes_carry_block_names_and_provenance() -> None:
    def run() -> list[tuple[str, str, str | None, str | None]]:
        model, spec = _read()
        before = {n.name for n in model.graph}
        apply_quantize(model, spec, QuantizeConfig({0: Int8Plan("both", "dynamic"),
                                                    1: Int8Plan("ffn", "dynamic")}))
        return [(n.name, n.op_type, n.metadata_props.get(PROVENANCE_PASS),
                 n.metadata_props.get(PROVENANCE_BLOCK))
                for n in model.graph if n.name not in before]

    added = run()
    assert added == run()  # deterministic
    blocks = {"layer0/attn", "layer0/ffn", "layer1/ffn"}
    assert {block for *_, block in added} == blocks
    assert all(p == PassName.QUANTIZE for _, _, p, _ in added)
    assert all(name.startswith(f"{block}/") for name, _, _, block in added)
    names = [name for name, *_ in added]
    assert len(set(names)) == len(names)
    assert "layer0/attn/q_k_v/int8/DynamicQuantizeLinear" in names  # one input, three users
    assert "layer1/ffn/w2/int8/MatMulInteger" in names


def test_attention_re_emitted_by_head_pruning_is_found_by_its_planer_names() -> None:
    model, spec = _read()
    selection = magnitude_selection(spec, Plan.neutral(spec))
    apply_head_pruning(model, spec, HeadPruningConfig(selection.heads))
    # `spec` still describes the model as read: its attention nodes are gone.
    assert apply_quantize(model, spec, QuantizeConfig({1: Int8Plan("attn", "dynamic")})) == 1
    quantized = {n.metadata_props.get(PROVENANCE_BLOCK) for n in model.graph
                 if n.op_type == "MatMulInteger"}
    assert quantized == {"layer1/attn"}


def test_dropped_block_and_second_run_are_refused() -> None:
    model, spec = _read()
    apply_head_pruning(model, spec, HeadPruningConfig({0: ()}))
    with pytest.raises(PreconditionError, match="no longer in the graph"):
        apply_quantize(model, spec, QuantizeConfig({0: Int8Plan("attn", "dynamic")}))
    apply_quantize(model, spec, QuantizeConfig({1: Int8Plan("ffn", "dynamic")}))
    with pytest.raises(PreconditionError, match="already quantized"):
        apply_quantize(model, spec, QuantizeConfig({1: Int8Plan("ffn", "dynamic")}))


def test_static_qdq_is_per_channel_and_close(tmp_path: Path) -> None:
    model, spec = _read()
    float_path = _save(model, tmp_path / "float.onnx")
    with pytest.raises(BadInputError, match="calibration"):
        apply_quantize(model, spec, QuantizeConfig({1: Int8Plan("ffn", "static")}))
    calib = _calib(model, spec)
    before = {n.name for n in model.graph}
    assert apply_quantize(model, spec, QuantizeConfig({1: Int8Plan("ffn", "static")}), calib) == 1
    nodes = {n.name: n for n in model.graph}
    added = [n for n in model.graph if n.name not in before and n.op_type != "MatMul"]
    # Per projection: weight DQ, input Q/DQ (w1 and w2 read different inputs), output Q/DQ.
    assert sorted(n.op_type for n in added) == sorted(
        ["DequantizeLinear"] * 6 + ["QuantizeLinear"] * 4)
    assert {(n.metadata_props.get(PROVENANCE_PASS), n.metadata_props.get(PROVENANCE_BLOCK))
            for n in added} == {(PassName.QUANTIZE, "layer1/ffn")}
    w1 = nodes["layer1/ffn/w1/MatMul"]  # kept, reading dequantized input and weight
    weight_dq = w1.inputs[1].producer()
    assert [v.producer().op_type for v in w1.inputs] == ["DequantizeLinear"] * 2
    scale = weight_dq.inputs[1].const_value.numpy()
    assert scale.shape == (spec.layers[1].ffn.width,)  # one scale per output channel
    assert weight_dq.inputs[0].const_value.dtype == ir.DataType.INT8
    feeds = _feeds(spec)
    want = run_ort(float_path, feeds)[0]
    have = run_ort(_save(model, tmp_path / "static.onnx"), feeds)[0]
    cosine = float((want * have).sum() / np.linalg.norm(want) / np.linalg.norm(have))
    assert cosine > 0.999
    assert not np.array_equal(want, have)


def test_static_ranges_cover_every_calibration_row(tmp_path: Path) -> None:
    model, spec = _read()
    calib = build_calibration(None, model_input_infos(model), vocab_size=spec.vocab_size,
                              seq_len=16, max_samples=32, batch_size=4, seed=0)
    assert len(calib.batches) == 6  # this input's maximum lies in an early batch
    x = spec.layers[0].ffn.w1.input.name  # what w1's input QuantizeLinear will scale
    proto = ir.serde.serialize_model(model)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT,
                                                                 None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    seen = np.concatenate([session.run([x], {k: v for k, v in feed.items() if k in names})[0]
                           .ravel() for feed in calib.batches])
    low, high = min(float(seen.min()), 0.0), max(float(seen.max()), 0.0)
    apply_quantize(model, spec, QuantizeConfig({0: Int8Plan("ffn", "static")}), calib)
    quantize = model.graph.node("layer0/ffn/w1/int8/QuantizeLinear")
    scale = float(quantize.inputs[1].const_value.numpy())
    assert scale == pytest.approx((high - low) / 255, rel=1e-5)  # uint8, min/max of all rows


def test_tensorrt_static_is_symmetric_and_in_its_operator_list() -> None:
    model, spec = _read()
    plan = Plan(tuple(LayerPlan(la.attention.heads, la.ffn.width,
                                int8=Int8Plan("both", "static")) for la in spec.layers))
    info = apply_int8(model, spec, plan, _calib(model, spec), target="tensorrt")
    assert info["layer0"] == {"blocks": "both", "mode": "static", "matmuls": 6}
    assert info["calibration"]["symmetric_activations"] is True
    assert check_ops(model, "tensorrt") == []
    for node in model.graph:
        if node.op_type == "QuantizeLinear":
            zero = node.inputs[2].const_value.numpy()
            assert zero.dtype == np.int8 and not zero.any()
    dynamic = Plan(tuple(LayerPlan(la.attention.heads, la.ffn.width,
                                   int8=Int8Plan("ffn", "dynamic")) for la in spec.layers))
    with pytest.raises(BadInputError, match="TensorRT"):
        apply_int8(model, spec, dynamic, None, target="tensorrt")


# ---------------------------------------------------------------- the plan's int8 field


def test_plan_int8_round_trips() -> None:
    _, spec = _read()
    data = {"layers": [{"heads": 2, "ffn": 16, "int8": {"blocks": "attn", "mode": "static"}},
                       {"int8": {"blocks": "both", "mode": "dynamic"}}]}
    plan = parse_plan(data, spec)
    assert plan.layers[0].int8 == Int8Plan("attn", "static")
    assert plan.layers[1].int8 is not None and plan.layers[1].int8.kinds() == ("attn", "ffn")
    assert parse_plan(plan.to_dict(), spec) == plan
    assert QuantizeConfig.from_plan(plan).layers == {0: Int8Plan("attn", "static"),
                                                     1: Int8Plan("both", "dynamic")}


@pytest.mark.parametrize(("int8", "extra", "message"), [
    ({"blocks": "mlp", "mode": "dynamic"}, {}, "blocks 'mlp' is not one of them"),
    ({"blocks": "ffn", "mode": "qat"}, {}, "mode 'qat' is not one of them"),
    ({"blocks": "ffn"}, {}, "must be an object"),
    ({"blocks": "ffn", "mode": "static", "bits": 4}, {}, "must be an object"),
    ("dynamic", {}, "must be an object"),
    ({"blocks": "attn", "mode": "dynamic"}, {"heads": 0}, "keeps 0 heads"),
    ({"blocks": "both", "mode": "dynamic"}, {"ffn": 0}, "keeps 0 channels"),
    ({"blocks": "ffn", "mode": "dynamic"}, {"moe": {"experts": 4, "top_k": 1}}, "experts"),
])
def test_plan_int8_refuses_bad_values(int8: object, extra: dict, message: str) -> None:
    _, spec = _read()
    data = {"layers": [{"int8": int8, **extra}, {}]}
    with pytest.raises(BadInputError, match=message):
        parse_plan(data, spec)
