"""The stage runner: planer's errors keep their sentence and exit code from inside any
stage, rewrites are checked for dead nodes, and the block analysis is found again only
after a stage changed the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from planer.compiler.driver import cli, pipeline
from planer.compiler.driver.compilation import Compilation, CompileOptions
from planer.compiler.driver.stages import Stage, dead_nodes, run_stages
from planer.compiler.errors import BadInputError
from planer.compiler.plan import Plan
from planer.fixtures.build import fixture_path

SENTENCE = "the planted stage error names what to do."


@pytest.fixture(scope="module")
def bert() -> Path:
    return fixture_path("bert", "dynamo")


def _compilation(path: Path) -> Compilation:
    model, spec = pipeline.read_model(path)
    return Compilation(path, CompileOptions(), model, Plan.neutral(spec), spec)


@pytest.mark.parametrize("index", range(len(pipeline.STAGES)),
                         ids=[s.name for s in pipeline.STAGES])
def test_a_planer_error_inside_any_stage_exits_2_with_its_sentence(
    index: int, bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stage = pipeline.STAGES[index]

    def planted(_c: Compilation) -> bool:
        raise BadInputError(SENTENCE)

    monkeypatch.setattr(stage, "applies", lambda _c: True)
    monkeypatch.setattr(stage, "requires", lambda _c: None)
    monkeypatch.setattr(stage, "run", planted)
    code = cli.main(["compile", str(bert), "-o", str(tmp_path / "out"), "--ort-kernels", "off"])
    err = capsys.readouterr()
    assert code == 2
    assert SENTENCE in err.out + err.err
    assert "internal error" not in err.out + err.err
    assert not (tmp_path / "out" / "model.onnx").exists()


class _LeavesDeadNode(Stage):
    name = "leaves_dead_node"

    def run(self, c: Compilation) -> bool:
        graph = c.model.graph
        x = graph.inputs[0]
        graph.append(ir.node("Shape", [x], name="orphan"))
        return True


def test_the_runner_refuses_a_stage_that_leaves_dead_nodes(bert: Path) -> None:
    c = _compilation(bert)
    assert dead_nodes(c.model.graph) == []
    with pytest.raises(AssertionError, match="leaves_dead_node stage left 1 dead nodes"):
        run_stages([_LeavesDeadNode()], c)


class _Counts(Stage):
    name = "counts"

    def __init__(self, modifies: bool):
        self.modifies = modifies

    def run(self, c: Compilation) -> bool:
        c.spec  # noqa: B018 - reads the analysis
        return self.modifies


def test_the_block_analysis_is_found_again_only_after_a_modifying_stage(
    bert: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = _compilation(bert)
    found = []
    real = pipeline.find_blocks
    monkeypatch.setattr("planer.compiler.driver.compilation.find_blocks",
                        lambda model: found.append(1) or real(model))
    run_stages([_Counts(False), _Counts(False)], c)
    assert found == []  # the spec read at the start still holds
    run_stages([_Counts(True), _Counts(False)], c)
    assert found == [1]  # dropped once by the modifying stage, found again by the next


def test_other_exceptions_stay_internal_and_name_the_stage(bert: Path) -> None:
    class Broken(Stage):
        name = "broken"

        def run(self, c: Compilation) -> bool:
            raise ValueError(np.float32(1).dtype.name)

    with pytest.raises(ValueError) as info:
        run_stages([Broken()], _compilation(bert))
    assert "(in planer's broken stage)" in info.value.__notes__


def test_an_int8_plan_compiles_through_every_stage(bert: Path, tmp_path: Path) -> None:
    _, spec = pipeline.read_model(bert)
    layers = [{"heads": la.attention.heads, "ffn": la.ffn.width,
               "int8": {"blocks": "both", "mode": "dynamic"}} for la in spec.layers]
    layers[0]["heads"] = max(1, spec.layers[0].attention.heads // 2)
    result = pipeline.compile_plan(bert, tmp_path / "out", plan_data={"layers": layers},
                                   ort_kernels="on")
    assert set(result.report["int8"]) >= {f"layer{i}" for i in range(len(layers))}
    ops = {n.op_type for n in ir.load(result.model_path).graph}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert result.report["verification"]["min_cosine"] > 0.9
