"""Golden structure files: a graph printed without its weights, kept under tests/golden/.

A golden is compared, never created, by a plain test run: a missing file fails the test
(its first run would otherwise pass against whatever the code printed). Only
`pytest --update-goldens` writes them; review the diff before committing it.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from planer.compiler.names import PROVENANCE_BLOCK, PROVENANCE_PASS

GOLDEN = Path(__file__).parent / "golden"


def structure(model: ir.Model | onnx.ModelProto | Path) -> str:
    """Prints one line per node (op, name, inputs with weights as <w>, outputs, provenance)."""
    if isinstance(model, Path):
        model = onnx.load(str(model), load_external_data=False)
    elif isinstance(model, ir.Model):
        model = ir.to_proto(model)
    inits = {t.name for t in model.graph.initializer}
    lines = []
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        ins = ", ".join("<w>" if i in inits else i for i in node.input)
        tag = f"  [{meta[PROVENANCE_PASS]} {meta[PROVENANCE_BLOCK]}]" \
            if PROVENANCE_PASS in meta else ""
        lines.append(f"{node.op_type} {node.name}({ins}) -> {', '.join(node.output)}{tag}")
    return "\n".join(lines) + "\n"


def check_golden(path: Path, text: str, *, update: bool) -> None:
    """Compares `text` with the golden file at `path`; with `update`, writes it instead.

    Fails (without writing anything) when the file does not exist and `update` is off.
    """
    if update:
        path.write_text(text)
        return
    if not path.is_file():
        pytest.fail(f"golden file {path.name} is missing from {path.parent}; create it with "
                    "`pytest --update-goldens` and review it before committing.")
    assert text == path.read_text(), f"{path.name} differs (pytest --update-goldens rewrites it)"
