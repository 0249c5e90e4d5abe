"""Writes the hostile-input corpus: broken models, bad paths, out-of-range options.

    python -m tests.hostile.make_corpus DIR      # writes DIR/, prints one JSON line per run

Every file is derived from one tiny valid model (the random-weight BERT of
`planer.fixtures`, TorchScript export: 2 layers, hidden 64, vocabulary 1000, 128
positions), so each case differs from a model planer accepts by exactly the defect it is
named after. `write_corpus` writes the files; `corpus_runs` lists the runs over them:
planer's argv, and what must happen, a refusal (exit 2) whose one sentence holds
`keyword`, or an acceptance (exit 0).

Classes (issue 17): invalid graphs, path problems, unchecked ranges, dtypes planer cannot
compute in, option values (inf/nan targets, a `null` plan, `-o ''`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB = 1000
POSITIONS = 128


@dataclasses.dataclass(frozen=True)
class Run:
    """One planer invocation and its required outcome.

    `argv` may hold "{out}", replaced by a fresh output folder path per run. `keyword` is
    required (case-insensitively) in the error sentence of a refusal. `subprocess` marks
    runs that could hang or exhaust memory if planer regressed: they never run in-process.
    """

    name: str
    argv: tuple[str, ...]
    expect: str  # "refuse" or "accept"
    keyword: str = ""
    subprocess: bool = False


Mutation = Callable[[onnx.ModelProto], None]


def base_model() -> onnx.ModelProto:
    """Returns the tiny valid model every case is derived from."""
    from planer.fixtures.build import fixture_path

    return onnx.load(str(fixture_path("bert", "torchscript")))


# --- invalid graphs --------------------------------------------------------------------


def _node(model: onnx.ModelProto, op: str, index: int = 0) -> onnx.NodeProto:
    return [n for n in model.graph.node if n.op_type == op][index]


def _cycle(model: onnx.ModelProto) -> None:
    # The embedding sum reads the LayerNorm that normalises it: Add -> LN -> Add.
    norm = _node(model, "LayerNormalization")
    add = next(n for n in model.graph.node if norm.input[0] in n.output)
    add.input[0] = norm.output[0]


def _dangling_output(model: onnx.ModelProto) -> None:
    model.graph.output.append(
        helper.make_tensor_value_info("produced_by_nothing", TensorProto.FLOAT, None))


def _deleted_input(model: onnx.ModelProto) -> None:
    keep = [i for i in model.graph.input if i.name != "attention_mask"]
    del model.graph.input[:]
    model.graph.input.extend(keep)


def _duplicate_initializer(model: onnx.ModelProto) -> None:
    twin = copy.deepcopy(model.graph.initializer[3])
    model.graph.initializer.append(twin)


def _duplicate_input(model: onnx.ModelProto) -> None:
    model.graph.input.append(copy.deepcopy(model.graph.input[0]))


def _softmax_axis(model: onnx.ModelProto) -> None:
    softmax = _node(model, "Softmax")
    del softmax.attribute[:]
    softmax.attribute.append(helper.make_attribute("axis", 1000))


def _int32_matmul(model: onnx.ModelProto) -> None:
    name = _node(model, "MatMul").input[1]
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == name)
    weight = numpy_helper.to_array(model.graph.initializer[index])
    model.graph.initializer[index].CopyFrom(
        numpy_helper.from_array((weight * 100).astype(np.int32), name))


def _float_input_ids(model: onnx.ModelProto) -> None:
    _input(model, "input_ids").type.tensor_type.elem_type = TensorProto.FLOAT


def _input(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    return next(i for i in model.graph.input if i.name == name)


def _dim(value: int, axis: int = 1) -> Mutation:
    def mutate(model: onnx.ModelProto) -> None:
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            dim = _input(model, name).type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = value
    return mutate


def _unknown_op(model: onnx.ModelProto) -> None:
    norm = _node(model, "LayerNormalization")
    index = list(model.graph.node).index(norm)
    out = norm.output[0]
    norm.output[0] = f"{out}_raw"
    model.graph.node.insert(index + 1, helper.make_node(
        "Frobnicate", [f"{out}_raw"], [out], name="frobnicate", domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))


def _ir_version(version: int) -> Mutation:
    def mutate(model: onnx.ModelProto) -> None:
        model.ir_version = version
    return mutate


def _huge_initializer(model: onnx.ModelProto) -> None:
    # Declares 2^40 floats but carries 16 bytes.
    tensor = model.graph.initializer[3]
    del tensor.dims[:]
    tensor.dims.extend([2**40])


# --- dtypes and values planer cannot compute on ----------------------------------------


def _float16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=False)


def _bfloat16(model: onnx.ModelProto) -> onnx.ModelProto:
    half = _float16(model)
    for tensor in half.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT16:
            values = numpy_helper.to_array(tensor).astype(np.float32)
            bits = (values.view(np.uint32) >> 16).astype(np.uint16)
            tensor.ClearField("raw_data")
            tensor.ClearField("int32_data")
            tensor.data_type = TensorProto.BFLOAT16
            tensor.raw_data = bits.tobytes()
    for value in (*half.graph.input, *half.graph.output, *half.graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for node in half.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
    return half


def _nan_weight(model: onnx.ModelProto) -> None:
    name = _node(model, "MatMul").input[1]
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == name)
    weight = numpy_helper.to_array(model.graph.initializer[index]).copy()
    weight[0, 0] = np.nan
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(weight, name))


def _no_inputs(model: onnx.ModelProto) -> None:
    # Every input becomes a fixed tensor: a valid model that takes nothing.
    for value in list(model.graph.input):
        model.graph.initializer.append(
            numpy_helper.from_array(np.ones((1, 8), dtype=np.int64), value.name))
    del model.graph.input[:]


# --- writing ---------------------------------------------------------------------------


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def _variant(base: onnx.ModelProto, mutate: Mutation, path: Path) -> None:
    model = copy.deepcopy(base)
    mutate(model)
    _save(model, path)


def _relocated(base: onnx.ModelProto, folder: Path, location: str | None) -> None:
    """Writes an external-data model whose first weight points at `location` (None: no key)."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(copy.deepcopy(base), str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.external_data)
    entries = [(e.key, e.value) for e in tensor.external_data if e.key != "location"]
    del tensor.external_data[:]
    if location is not None:
        entries.insert(0, ("location", location))
    for key, value in entries:
        tensor.external_data.add(key=key, value=value)
    _save(proto, folder / "model.onnx")


def _symlink(target: Path, link: Path) -> None:
    if not link.is_symlink():
        os.symlink(target, link)


def _fifo(path: Path) -> None:
    if not path.exists():
        os.mkfifo(path)


def _nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


GRAPH_CASES: list[tuple[str, Mutation, str]] = [
    ("cycle", _cycle, "cycle"),
    ("dangling-output", _dangling_output, "produced_by_nothing"),
    ("deleted-input", _deleted_input, "attention_mask"),
    ("duplicate-initializer", _duplicate_initializer, "twice"),
    ("duplicate-input", _duplicate_input, "twice"),
    ("softmax-axis-1000", _softmax_axis, "axis"),
    ("int32-matmul-weight", _int32_matmul, "type"),
    ("float-input-ids", _float_input_ids, "input_ids"),
    ("input-dim-minus-5", _dim(-5), "dimension -5"),
    ("input-dim-2-40", _dim(2**40), f"dimension {2**40}"),
    ("input-dim-0", _dim(0, axis=0), "dimension 0"),
    ("initializer-dims-2-40", _huge_initializer, "model.embeddings.LayerNorm.weight"),
    ("unknown-domain-op", _unknown_op, "com.example"),
    ("ir-version-99", _ir_version(99), "IR version 99"),
    ("ir-version-0", _ir_version(0), "IR version 0"),
    ("nan-weight", _nan_weight, "NaN"),
    ("no-inputs", _no_inputs, "no inputs"),
]
DTYPE_CASES: list[tuple[str, Callable[[onnx.ModelProto], onnx.ModelProto]]] = [
    ("float16", _float16), ("bfloat16", _bfloat16)]
# (folder under paths/, external-data location of the first weight, keyword)
DATA_CASES = [("no-location", None, "location"), ("long", "d" * 5000, "too long"),
              ("traversal", "../outside.bin", "outside"),
              ("absolute", "{root}/paths/outside.bin", "outside"),
              ("data-loop", "loop.data", "symbolic link loop")]


def write_corpus(root: Path, base: onnx.ModelProto | None = None) -> None:
    """Writes every file the runs of `corpus_runs(root)` read."""
    base = base or base_model()
    _save(base, root / "good" / "model.onnx")
    for name, mutate, _ in GRAPH_CASES:
        _variant(base, mutate, root / "graphs" / f"{name}.onnx")
    for name, convert in DTYPE_CASES:
        _save(convert(base), root / "dtypes" / f"{name}.onnx")
    paths = root / "paths"
    paths.mkdir(parents=True, exist_ok=True)
    (paths / "outside.bin").write_bytes(b"\0" * 4096)
    for folder, location, _ in DATA_CASES:
        where = None if location is None else location.replace("{root}", str(root))
        _relocated(base, paths / folder, where)
    _symlink(paths / "data-loop" / "loop.data", paths / "data-loop" / "loop.data")
    _symlink(paths / "loop2.onnx", paths / "loop.onnx")
    _symlink(paths / "loop.onnx", paths / "loop2.onnx")
    _fifo(paths / "fifo.onnx")
    (paths / "a-file").write_text("not a folder\n")
    (paths / "read-only").mkdir(exist_ok=True)
    (paths / "read-only").chmod(0o555)
    _write_ranges(root / "ranges")
    options = root / "options"
    options.mkdir(parents=True, exist_ok=True)
    (options / "null.json").write_text("null\n")
    _fifo(options / "plan.fifo")


def _write_ranges(ranges: Path) -> None:
    ranges.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(16, 16))
    for name, values in (("ids-over-vocab", np.where(ids % 5 == 0, VOCAB + 7, ids)),
                         ("ids-negative", np.where(ids % 5 == 0, -3, ids)), ("ids-fine", ids)):
        np.savez(ranges / f"{name}.npz", input_ids=values, attention_mask=np.ones_like(values),
                 token_type_ids=np.zeros_like(values))
    (ranges / "plan-nested.json").write_text(_nested_json(100_000))
    (ranges / "calibration-nested.jsonl").write_text(
        '{"text": "a fine line"}\n' + _nested_json(100_000) + "\n")
    (ranges / "tok").mkdir(exist_ok=True)
    (ranges / "tok" / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "fine", "line"]) + "\n")


# --- runs ------------------------------------------------------------------------------


def _both(name: str, model: str, keyword: str, *, subprocess: bool = False) -> list[Run]:
    """The same refusal from `inspect` and from `compile`."""
    return [Run(f"inspect-{name}", ("inspect", model), "refuse", keyword, subprocess),
            Run(f"compile-{name}", ("compile", model, "-o", "{out}", "--ort-kernels", "off"),
                "refuse", keyword, subprocess)]


def corpus_runs(root: Path) -> list[Run]:
    """Returns every run over the corpus at `root` (pure: `write_corpus` makes the files)."""
    good = str(root / "good" / "model.onnx")
    runs = [Run("inspect-good", ("inspect", good), "accept"),
            Run("compile-good", ("compile", good, "-o", "{out}", "--ort-kernels", "off"),
                "accept")]
    for name, _, keyword in GRAPH_CASES:
        runs += _both(name, str(root / "graphs" / f"{name}.onnx"), keyword)
    for name, _ in DTYPE_CASES:
        runs += _both(name, str(root / "dtypes" / f"{name}.onnx"), name)
    paths = root / "paths"
    for folder, _, keyword in DATA_CASES:
        runs += _both(f"data-{folder}", str(paths / folder / "model.onnx"), keyword)
    runs += _both("model-symlink-loop", str(paths / "loop.onnx"), "symbolic link loop")
    runs += _both("model-is-fifo", str(paths / "fifo.onnx"), "not a regular file",
                  subprocess=True)
    runs += _both("model-is-dev-zero", "/dev/zero", "not a regular file", subprocess=True)
    runs += _both("model-is-folder", str(paths), "folder")
    return runs + _output_runs(root, good) + _range_runs(root, good) + _option_runs(root, good)


def _compile(good: str, *extra: str, out: str = "{out}") -> tuple[str, ...]:
    return ("compile", good, "-o", out, "--ort-kernels", "off", *extra)


def _output_runs(root: Path, good: str) -> list[Run]:
    paths = root / "paths"
    # root writes through mode bits, so it gets a folder the kernel refuses to anyone.
    readonly = "/sys/planer-out" if os.geteuid() == 0 else str(paths / "read-only" / "out")
    return [
        Run("output-read-only", _compile(good, out=readonly), "refuse", "cannot write"),
        Run("output-under-a-file", _compile(good, out=str(paths / "a-file" / "out")), "refuse",
            "a-file is a file"),
        Run("output-in-proc", _compile(good, out="/proc/planer-out"), "refuse", "cannot write"),
        Run("output-symlink-loop", _compile(good, out=str(paths / "loop.onnx")), "refuse",
            "symbolic link loop"),
        Run("output-empty", _compile(good, out=""), "refuse", "empty"),
        Run("output-is-the-model", _compile(good, out=good), "refuse", "input model"),
    ]


def _range_runs(root: Path, good: str) -> list[Run]:
    ranges = root / "ranges"
    too_long = str(POSITIONS + 1)
    return [
        Run("seq-len-129-flops", _compile(good, "--seq-len", too_long, "--target-flops", "0.5"),
            "refuse", "position table"),
        Run("seq-len-100000-flops", _compile(good, "--seq-len", "100000", "--target-flops",
                                             "0.5"), "refuse", "position table", True),
        Run("seq-len-128-flops", _compile(good, "--seq-len", str(POSITIONS), "--target-flops",
                                          "0.5"), "accept"),
        Run("npz-ids-over-vocab", _compile(good, "--calibration",
                                           str(ranges / "ids-over-vocab.npz"), "--seq-len", "16"),
            "refuse", "vocabulary"),
        Run("npz-ids-negative", _compile(good, "--calibration", str(ranges / "ids-negative.npz"),
                                         "--seq-len", "16"), "refuse", "vocabulary"),
        Run("npz-ids-fine", _compile(good, "--calibration", str(ranges / "ids-fine.npz"),
                                     "--seq-len", "16"), "accept"),
        Run("plan-nested-100000", _compile(good, "--plan", str(ranges / "plan-nested.json")),
            "refuse", "nested too deeply"),
        Run("calibration-nested-100000",
            _compile(good, "--calibration", str(ranges / "calibration-nested.jsonl"),
                     "--tokenizer", str(ranges / "tok"), "--target-flops", "0.5"),
            "refuse", "nested too deeply"),
    ]


def _option_runs(root: Path, good: str) -> list[Run]:
    options = root / "options"
    return [
        Run("latency-inf", _compile(good, "--target-latency", "infms"), "refuse", "finite", True),
        Run("latency-nan", _compile(good, "--target-latency", "nan%"), "refuse", "finite", True),
        Run("latency-negative", _compile(good, "--target-latency=-5ms"), "refuse", "above 0"),
        Run("latency-over-100", _compile(good, "--target-latency", "150%"), "refuse", "at most"),
        Run("flops-nan", _compile(good, "--target-flops", "nan"), "refuse", "target-flops"),
        Run("plan-null", _compile(good, "--plan", str(options / "null.json")), "refuse", "null"),
        Run("plan-is-fifo", _compile(good, "--plan", str(options / "plan.fifo")), "refuse",
            "not a regular file", True),
        Run("calibration-is-dev-zero", _compile(good, "--calibration", "/dev/zero",
                                                "--tokenizer", str(root / "ranges" / "tok"),
                                                "--target-flops", "0.5"),
            "refuse", "not a regular file", True),
    ]


def main(argv: list[str] | None = None) -> int:
    """Writes the corpus into the folder named on the command line and lists its runs."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tests.hostile.make_corpus DIR", file=sys.stderr)
        return 2
    root = Path(args[0]).resolve()
    write_corpus(root)
    for run in corpus_runs(root):
        print(json.dumps(dataclasses.asdict(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
