"""FLOPs measured on the emitted graph agree with report.json's figures.

The report's `flops_before`/`flops_after` are computed from the ModelSpec (the plan's
head and channel counts). Here they are counted independently, from the graph planer
wrote: every MatMul's (and the exports' Gemm's) output shape after ONNX Runtime's
symbolic shape inference at the compile's batch and sequence length, times its
reduction width, times 2. A rewrite that kept more (or fewer) columns than the plan
says, or a dead copy of a block left running, shows up as a mismatch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import onnx
import pytest
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from planer.compiler.driver.pipeline import compile_plan
from planer.fixtures.build import fixture_path

PLAN = {"layers": [{"heads": 2, "ffn": 48}, {"heads": 3, "ffn": 100}]}
BATCH, SEQ = 2, 16


def matmul_flops(path: Path, *, batch: int, seq_len: int) -> int:
    """Counts 2 x multiply-adds of every MatMul and Gemm at [batch, seq_len] inputs."""
    model = onnx.load(str(path))
    for graph_input in model.graph.input:
        for dim, size in zip(graph_input.type.tensor_type.shape.dim, (batch, seq_len),
                             strict=False):
            dim.Clear()
            dim.dim_value = size
    model = SymbolicShapeInference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                       for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        assert a and out and None not in (*a, *out), f"{node.name}: shapes not inferred"
        trans_a = any(att.name == "transA" and att.i for att in node.attribute)
        total += 2 * math.prod(out) * (a[0] if trans_a else a[-1])
    return total


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_emitted_matmul_flops_match_the_report(family: str, tmp_path: Path) -> None:
    source = fixture_path(family, "dynamo")
    result = compile_plan(source, tmp_path / "out", plan_data=PLAN, batch=BATCH, seq_len=SEQ)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["batch"], report["seq_len"]) == (BATCH, SEQ)
    assert matmul_flops(source, batch=BATCH, seq_len=SEQ) == report["flops_before"]
    assert matmul_flops(result.model_path, batch=BATCH, seq_len=SEQ) == report["flops_after"]
    assert report["flops_after"] < report["flops_before"]
