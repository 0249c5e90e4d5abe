"""Writes compiled models atomically and verifies them before anything is reported.

    claim OUT (checks, lock) ─▶ stage OUT/.planer-tmp-<pid>-*/ ─▶ save model (+ data)
    ─▶ full ONNX checker + ORT load (all optimizations) and one run ─▶ measurements
    ─▶ plan.json, report.json ─▶ commit the whole set (compiler.outdir: journal, manifest)

A failed check leaves the output folder as it was. The input model is never a
destination, and files planer did not write are never replaced.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from planer.compiler import outdir
from planer.compiler.errors import BadInputError, PlanerError
from planer.compiler.loading import check_model_file

logger = logging.getLogger(__name__)

# The form of the graphs planer emits. Bump it whenever a change makes the emitted graph of
# some block different (nodes, their order or attributes): stored latency measurements of
# block variants (cost_model.profile) are keyed by it, so older ones are measured again.
EMISSION_VERSION = 1

MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
UNREACHABLE_NAME = "fastest-missed-target.onnx"
OWN_FILES = (MODEL_NAME, DATA_NAME, UNREACHABLE_NAME, f"{UNREACHABLE_NAME}.data", "plan.json",
             "report.json", "report.html")
# Renders text pages (report.html) from the final report.json and the written model.
Pages = Callable[[Mapping[str, Any], Path], Mapping[str, str]]
TWO_GB = 2**31
MAX_IR_VERSION = 10  # ORT releases before 1.20 reject newer IR versions


class VerificationError(PlanerError):
    """The emitted model failed the ONNX checker or would not run in ONNX Runtime."""


def check_output_location(model_path: Path, out_dir: Path) -> None:
    """Refuses output folders that would overwrite the input or a user's own files.

    Raises:
        BadInputError: `out_dir` is the input, a file, a symbolic link loop, or holds
            files planer did not write.
    """
    check_model_file(model_path)  # before anything opens it: a FIFO would block
    src = model_path.resolve()
    out = outdir.resolve_output(out_dir)
    if out == src:
        raise BadInputError(f"-o {out_dir} points at the input model; choose a new folder.")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"-o {out_dir} is a file; planer writes a folder of outputs there.")
    inputs = {src, *(src.parent / name for name in _external_files(src))}
    for name in OWN_FILES:
        if (out / name).resolve() in inputs:
            raise BadInputError(
                f"writing to {out_dir} would overwrite the input model's {name}; "
                "choose another folder."
            )
    if out.is_dir() and not _written_by_planer(out):
        clashes = [name for name in OWN_FILES if (out / name).exists()]
        if clashes:
            raise BadInputError(
                f"{out_dir} already holds {', '.join(clashes)} that planer did not write; "
                "choose an empty or new folder."
            )


@contextlib.contextmanager
def claim_output(model_path: Path, out_dir: Path) -> Iterator[Path]:
    """Checks OUT (`check_output_location`) and holds its lock for the block.

    Wrap a whole compile in it, so a second planer writing the same OUT is refused at
    once rather than after its work; `write_outputs` takes the same lock on its own
    (re-entrantly) for callers that do not.
    """
    check_output_location(model_path, out_dir)
    with outdir.output_lock(out_dir) as out:
        yield out


def write_outputs(
    model: ir.Model,
    out_dir: Path,
    *,
    documents: Mapping[str, Any],
    external_data: bool,
    feeds: Mapping[str, np.ndarray],
    before_commit: Callable[[Path], Mapping[str, Any]] | None = None,
    pages: Pages | None = None,
) -> dict[str, Any]:
    """Saves `model` plus JSON `documents` into `out_dir` after verifying the model.

    The new files replace planer's earlier set in OUT as one unit (`compiler.outdir`).

    Args:
        model: the compiled model.
        out_dir: destination folder (created if missing; removed again on failure).
        documents: file name -> JSON-ready object (plan.json, report.json).
        external_data: keep weights in `model.onnx.data` beside the model.
        feeds: inputs for the ORT load-and-run check.
        before_commit: called with the verified temporary model path; the dict it
            returns is merged into `report.json` (measured fidelity, latency).
        pages: renders text files (report.html) from the final report and the model.

    Returns:
        The documents as written (report.json with the measurements merged in).
    """
    with outdir.output_lock(out_dir) as out:
        tmp = _staging(out, out_dir)
        try:
            model.ir_version = min(model.ir_version, MAX_IR_VERSION)
            path = tmp / MODEL_NAME
            big = _weight_bytes(model) >= TWO_GB
            ir.save(model, path, external_data=DATA_NAME if (external_data or big) else None)
            outdir.checkpoint("saved")
            verify_model(path, feeds)
            docs = dict(documents)
            if before_commit is not None:
                extra = before_commit(path)
                docs["report.json"] = {**docs.get("report.json", {}), **extra}
            for name, content in docs.items():
                write_json(tmp / name, content)
            _write_pages(tmp, pages, docs.get("report.json", {}), path)
            outdir.commit(tmp, out, replaces=OWN_FILES)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return docs


def commit_folder(folder: Path, out_dir: Path, *, model_name: str = MODEL_NAME,
                  report: Mapping[str, Any] | None = None, pages: Pages | None = None) -> Path:
    """Makes a verified output folder (a latency round's) OUT's output set, atomically.

    `folder` holds what `write_outputs` wrote. Its files are moved (copied across file
    systems) into a stage inside OUT; the model is renamed `model_name` (its external
    data file and the references to it follow), `report` replaces report.json, and the
    stage is committed. Returns the model's path in OUT.
    """
    with outdir.output_lock(out_dir) as out:
        tmp = _staging(out, out_dir)
        try:
            for entry in folder.iterdir():
                # The round's own manifest and lock are its folder's, not the set's.
                if entry.is_file() and entry.name in OWN_FILES:
                    _move(entry, tmp / entry.name)
            if model_name != MODEL_NAME:
                _rename_model(tmp, model_name)
            if report is not None:
                write_json(tmp / "report.json", report)
                _write_pages(tmp, pages, report, tmp / model_name)
            outdir.commit(tmp, out, replaces=OWN_FILES)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir / model_name


def _write_pages(folder: Path, pages: Pages | None, report: Mapping[str, Any],
                 model: Path) -> None:
    if pages is not None:
        for name, text in pages(report, model).items():
            (folder / name).write_text(text, encoding="utf-8")


def write_json(path: Path, content: Any) -> None:
    """Writes `content` as indented JSON (numpy values and paths as plain JSON)."""
    path.write_text(json.dumps(content, indent=2, default=_json_default) + "\n")


def verify_model(path: Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Runs the full ONNX checker and an ORT load-and-run on `path`; returns the outputs.

    Raises:
        VerificationError: the model is invalid, fails to load, or produces NaN.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise VerificationError(f"the emitted model fails the ONNX checker: {exc}") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, dict(feeds))
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime cannot run the emitted model: {exc}") from exc
    for name, array in zip((o.name for o in session.get_outputs()), outputs, strict=True):
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise VerificationError(f"the emitted model's output {name!r} holds NaN or Inf.")
    return outputs


def _staging(out: Path, shown: Path) -> Path:
    try:
        return outdir.staging_folder(out)
    except OSError as exc:
        raise BadInputError(f"planer cannot write to -o {shown} "
                            f"({(exc.strerror or type(exc).__name__).lower()}).") from exc


def _move(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(source, target)  # the round folder lives on another file system


def _rename_model(folder: Path, name: str) -> None:
    """Renames folder/model.onnx to `name`, its data file to `name`.data and the references."""
    data = folder / DATA_NAME
    if data.exists():
        proto = onnx.load(str(folder / MODEL_NAME), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = f"{name}.data"
        onnx.save(proto, str(folder / MODEL_NAME))
        os.replace(data, folder / f"{name}.data")
    os.replace(folder / MODEL_NAME, folder / name)


def _written_by_planer(folder: Path) -> bool:
    if outdir.read_manifest(folder) is not None:
        return True
    report = folder / "report.json"  # outputs of planer before the manifest
    try:
        return json.loads(report.read_text()).get("tool") == "planer"
    except (OSError, ValueError, AttributeError):
        return False


def _external_files(path: Path) -> set[str]:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    names = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return names


def _weight_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
