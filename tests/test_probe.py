"""benchmarks/probe.py's Embedder pools the token hidden states, wherever the model lists them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.probe import Embedder
from planer.fixtures.build import minilm_tokenizer_dir

VOCAB, WIDTH = 30522, 4  # bert-base-uncased's vocabulary, which the MiniLM tokenizer emits


def _echo_model(path: Path, *, hidden: bool) -> np.ndarray:
    """Writes a model whose output 0 echoes input_ids, as paraphrase-MiniLM-L3-v2's does.

    With `hidden`, output 1 is hidden_BSD = table_VD[input_ids]; returns the table.
    """
    table_VD = np.random.default_rng(0).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"])
    echo = helper.make_tensor_value_info("ids_echo_BS", TensorProto.INT64, ["B", "S"])
    nodes = [helper.make_node("Identity", ["input_ids"], ["ids_echo_BS"], name="echo")]
    outputs, initializers = [echo], []
    if hidden:
        nodes.append(helper.make_node("Gather", ["table_VD", "input_ids"], ["hidden_BSD"],
                                      name="embed"))
        outputs.append(helper.make_tensor_value_info("hidden_BSD", TensorProto.FLOAT,
                                                     ["B", "S", WIDTH]))
        initializers.append(numpy_helper.from_array(table_VD, "table_VD"))
    graph = helper.make_graph(nodes, "echo", [ids], outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return table_VD


def test_embedder_pools_the_first_float_rank3_output_not_output_0(tmp_path):
    path = tmp_path / "echo.onnx"
    table_VD = _echo_model(path, hidden=True)
    embed = Embedder(path, minilm_tokenizer_dir(), threads=1)
    assert embed.output == "hidden_BSD"
    texts = ["a short one", "a somewhat longer sentence to pad the short one against"]
    ids = [embed.tokenizer.encode(t).ids for t in texts]
    expected = np.stack([table_VD[i].mean(0) for i in ids])
    # Padding rows are masked out of the mean, so a batch matches texts embedded alone.
    np.testing.assert_allclose(embed(texts), expected, rtol=1e-6, atol=1e-6)


def test_embedder_without_hidden_states_says_so(tmp_path):
    path = tmp_path / "echo-only.onnx"
    _echo_model(path, hidden=False)
    with pytest.raises(ValueError, match="has no float output of rank 3"):
        Embedder(path, minilm_tokenizer_dir(), threads=1)
