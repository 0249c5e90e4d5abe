"""A Plan: per-layer block choices, as JSON a user can read and hand-edit.

    {"layers": [{"heads": 6, "ffn": 768}, {"heads": 12, "ffn": 1536}, ...]}

Counts are what each layer keeps. Later passes add optional per-layer fields
(`moe`, `skim_keep`); fields planer does not know are rejected, so a typo never
silently does nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from planer.compiler.errors import BadInputError
from planer.compiler.spec import ModelSpec

KNOWN_FIELDS = {"heads", "ffn"}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one layer keeps."""

    heads: int
    ffn: int

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads, "ffn": self.ffn}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-layer choices for a whole model."""

    layers: tuple[LayerPlan, ...]

    @staticmethod
    def neutral(spec: ModelSpec) -> Plan:
        """Returns the plan that keeps everything (reproduces the original model)."""
        return Plan(tuple(
            LayerPlan(heads=layer.attention.heads, ffn=layer.ffn.width) for layer in spec.layers
        ))

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [layer.to_dict() for layer in self.layers]}

    def is_neutral(self, spec: ModelSpec) -> bool:
        return self == Plan.neutral(spec)


def load_plan(path: str | Path) -> dict[str, Any]:
    """Reads a plan file as JSON, with a clear error when it is missing or malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BadInputError(f"plan file {path} does not exist.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"plan file {path} is not valid JSON ({exc}).") from exc
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
        layers.append(LayerPlan(heads=heads, ffn=ffn))
    return Plan(tuple(layers))


def _count(entry: dict[str, Any], field: str, limit: int, index: int) -> int:
    value = entry.get(field, limit)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInputError(f"plan layer {index} {field} must be a whole number, not {value!r}.")
    if not 0 <= value <= limit:
        raise BadInputError(
            f"plan layer {index} asks for {value} {field}, but that layer has {limit}."
        )
    return value
