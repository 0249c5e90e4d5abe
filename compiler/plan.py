"""A Plan: per-layer block choices, as JSON a user can read and hand-edit.

    {"layers": [{"heads": 6, "ffn": 768}, {"heads": 12, "ffn": 1536}, ...]}

Counts are what each layer keeps. Later passes add optional per-layer fields
(`moe`, `skim_keep`, `int8`: {"blocks": "attn"|"ffn"|"both", "mode": "dynamic"|"static"});
fields planer does not know are rejected, so a typo never silently does nothing. One
model-level field: `"mux": N` (1, 2 or 4 instances per backbone row; default 1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from planer.compiler import files
from planer.compiler.errors import BadInputError
from planer.compiler.spec import ModelSpec

KNOWN_FIELDS = {"heads", "ffn", "moe", "skim_keep", "int8"}
MOE_FIELDS = {"experts", "top_k", "tau", "activation"}
MOE_ACTIVATIONS = ("relu",)  # DSTI's ReLU-fication: experts run ReLU in place of the FFN's
MAX_PLAN_BYTES = 16 * files.MIB  # a plan names a few numbers per layer
INT8_BLOCKS = ("attn", "ffn", "both")
INT8_MODES = ("dynamic", "static")
MUX_WIDTHS = (1, 2, 4)


@dataclasses.dataclass(frozen=True)
class MoePlan:
    """The FFN as `experts` equal experts, run per token by static top-k or dynamic-k (tau)."""

    experts: int
    top_k: int | None = None
    tau: float | None = None
    activation: str | None = None  # "relu" (ReLU-fied experts), or None: the FFN's own

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"experts": self.experts}
        if self.top_k is not None:
            data["top_k"] = self.top_k
        if self.tau is not None:
            data["tau"] = self.tau
        if self.activation is not None:
            data["activation"] = self.activation
        return data


@dataclasses.dataclass(frozen=True)
class Int8Plan:
    """Which of the layer's blocks run in INT8, quantized dynamically or statically (QDQ)."""

    blocks: str  # "attn", "ffn" or "both"
    mode: str  # "dynamic" (MatMulInteger) or "static" (QDQ, calibrated ranges)

    def kinds(self) -> tuple[str, ...]:
        """The block kinds quantized: ("attn",), ("ffn",) or ("attn", "ffn")."""
        return ("attn", "ffn") if self.blocks == "both" else (self.blocks,)

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "mode": self.mode}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one layer keeps.

    Attributes:
        heads: attention heads kept.
        ffn: FFN channels kept.
        moe: the FFN split into experts, or None for a dense FFN.
        skim_keep: fraction of the still-active tokens kept entering this layer
            (cumulative), or None for all of them.
        int8: the blocks quantized to INT8, or None for float.
    """

    heads: int
    ffn: int
    moe: MoePlan | None = None
    skim_keep: float | None = None
    int8: Int8Plan | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"heads": self.heads, "ffn": self.ffn}
        if self.moe is not None:
            data["moe"] = self.moe.to_dict()
        if self.skim_keep is not None:
            data["skim_keep"] = self.skim_keep
        if self.int8 is not None:
            data["int8"] = self.int8.to_dict()
        return data


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-layer choices for a whole model, and how many instances share a row (`mux`)."""

    layers: tuple[LayerPlan, ...]
    mux: int = 1

    @staticmethod
    def neutral(spec: ModelSpec) -> Plan:
        """Returns the plan that keeps everything (reproduces the original model)."""
        return Plan(tuple(
            LayerPlan(heads=layer.attention.heads, ffn=layer.ffn.width) for layer in spec.layers
        ))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"layers": [layer.to_dict() for layer in self.layers]}
        if self.mux != 1:
            data["mux"] = self.mux
        return data


def load_plan(path: str | Path) -> dict[str, Any]:
    """Reads a plan file as a JSON object, with a clear error when it is unusable.

    Raises:
        BadInputError: the file is missing, not a regular file, over 16 MiB, not UTF-8
            JSON, nested too deeply, or holds something other than a JSON object.
    """
    path = Path(path)
    raw = files.read_bytes(path, "plan file", max_bytes=MAX_PLAN_BYTES)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInputError(f"plan file {path} is not UTF-8 text.") from None
    data = files.parse_json(text, f"plan file {path}")
    if not isinstance(data, dict):
        kind = "null" if data is None else f"a JSON {type(data).__name__}"
        raise BadInputError(f'plan file {path} holds {kind}, not a JSON object with a "layers" '
                            "list.")
    return data


def parse_plan(data: Any, spec: ModelSpec) -> Plan:
    """Validates plan JSON against the model and returns the Plan.

    Raises:
        BadInputError: the layer count, a field or a size does not fit the model.
    """
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise BadInputError('a plan must be a JSON object with a "layers" list.')
    entries = data["layers"]
    if len(entries) != len(spec.layers):
        raise BadInputError(
            f"the plan has {len(entries)} layers but the model has {len(spec.layers)}."
        )
    layers = []
    for i, (entry, layer) in enumerate(zip(entries, spec.layers, strict=True)):
        if not isinstance(entry, dict):
            raise BadInputError(f"plan layer {i} must be a JSON object.")
        unknown = set(entry) - KNOWN_FIELDS
        if unknown:
            raise BadInputError(
                f"plan layer {i} has unknown field(s) {', '.join(sorted(unknown))}; "
                f"known fields are {', '.join(sorted(KNOWN_FIELDS))}."
            )
        heads = _count(entry, "heads", layer.attention.heads, i)
        ffn = _count(entry, "ffn", layer.ffn.width, i)
        moe = _moe(entry.get("moe"), ffn, i)
        skim = _skim(entry.get("skim_keep"), i)
        int8 = _int8(entry.get("int8"), i)
        _check_int8_fits(int8, heads, ffn, moe, i)
        layers.append(LayerPlan(heads=heads, ffn=ffn, moe=moe, skim_keep=skim, int8=int8))
    return Plan(tuple(layers), mux=_mux(data.get("mux", 1)))


def _mux(value: Any) -> int:
    if isinstance(value, bool) or value not in MUX_WIDTHS:
        raise BadInputError(f"plan mux must be one of {', '.join(map(str, MUX_WIDTHS))}, "
                            f"not {value!r}.")
    return int(value)


def _count(entry: dict[str, Any], field: str, limit: int, index: int) -> int:
    value = entry.get(field, limit)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInputError(f"plan layer {index} {field} must be a whole number, not {value!r}.")
    if not 0 <= value <= limit:
        raise BadInputError(
            f"plan layer {index} asks for {value} {field}, but that layer has {limit}."
        )
    return value


def _moe(value: Any, ffn: int, index: int) -> MoePlan | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - MOE_FIELDS:
        raise BadInputError(
            f'plan layer {index} moe must be an object with "experts" and "top_k" or "tau" '
            '(and optionally "activation").'
        )
    experts = _count(value, "experts", ffn, index) if "experts" in value else 0
    if experts < 1 or ffn % experts:
        raise BadInputError(
            f"plan layer {index} asks for {experts} experts, which must divide its "
            f"{ffn} FFN channels evenly."
        )
    top_k, tau = value.get("top_k"), value.get("tau")
    if (top_k is None) == (tau is None):
        raise BadInputError(f'plan layer {index} moe needs exactly one of "top_k" or "tau".')
    if top_k is not None:
        top_k = _count(value, "top_k", experts, index)
        if top_k < 1:
            raise BadInputError(f"plan layer {index} moe top_k must be at least 1.")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, int | float)
                            or not 0.0 <= tau <= 1.0):
        raise BadInputError(f"plan layer {index} moe tau must be a number in [0, 1].")
    activation = value.get("activation")
    if activation is not None and activation not in MOE_ACTIVATIONS:
        raise BadInputError(f"plan layer {index} moe activation must be "
                            f"{' or '.join(repr(a) for a in MOE_ACTIVATIONS)}, not {activation!r}.")
    return MoePlan(experts=experts, top_k=top_k, tau=None if tau is None else float(tau),
                   activation=activation)


def _skim(value: Any, index: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise BadInputError(f"plan layer {index} skim_keep must be a number in (0, 1].")
    return float(value)


def _int8(value: Any, index: int) -> Int8Plan | None:
    if value is None:
        return None
    shape = (f'plan layer {index} int8 must be an object {{"blocks": '
             f'{"|".join(INT8_BLOCKS)}, "mode": {"|".join(INT8_MODES)}}}')
    if not isinstance(value, dict) or set(value) != {"blocks", "mode"}:
        raise BadInputError(f"{shape}, not {value!r}.")
    blocks, mode = value["blocks"], value["mode"]
    if blocks not in INT8_BLOCKS:
        raise BadInputError(f"{shape}; blocks {blocks!r} is not one of them.")
    if mode not in INT8_MODES:
        raise BadInputError(f"{shape}; mode {mode!r} is not one of them.")
    return Int8Plan(blocks=blocks, mode=mode)


def _check_int8_fits(int8: Int8Plan | None, heads: int, ffn: int, moe: MoePlan | None,
                     index: int) -> None:
    """Refuses INT8 for a block the same plan drops or splits into experts."""
    if int8 is None:
        return
    if "attn" in int8.kinds() and heads == 0:
        raise BadInputError(f"plan layer {index} quantizes attention to int8 but keeps 0 heads; "
                            'set int8 blocks to "ffn" or keep some heads.')
    if "ffn" in int8.kinds() and ffn == 0:
        raise BadInputError(f"plan layer {index} quantizes the FFN to int8 but keeps 0 "
                            'channels; set int8 blocks to "attn" or keep some channels.')
    if "ffn" in int8.kinds() and moe is not None:
        raise BadInputError(f"plan layer {index} quantizes an FFN it splits into experts; "
                            'int8 of MoE experts is not supported yet, set int8 blocks to "attn".')
