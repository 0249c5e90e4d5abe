"""The names planer's graphs and reports share: block ids and pass names.

Every node a pass adds carries `planer.pass` (one of the PassName constants) and
`planer.block` (a BlockId spelled as a string, e.g. `layer3/ffn`). The core reads both
back (the finder skips MoE nodes, the diff matches blocks), so both are defined here,
once, and every module builds and parses them through this file rather than by hand.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Final

PROVENANCE_PASS: Final = "planer.pass"
PROVENANCE_BLOCK: Final = "planer.block"


class PassName:
    """The `planer.pass` value of each stage that adds nodes (also the report's keys)."""

    CANONICALIZE: Final = "canonicalize"
    HEAD_PRUNING: Final = "head_pruning"
    CHANNEL_PRUNING: Final = "channel_pruning"
    FFN_TO_MOE: Final = "ffn_to_moe"
    TOKEN_SKIM: Final = "token_skim"
    ORT_KERNELS: Final = "ort_kernels"
    RECOVER: Final = "recover"
    QUANTIZE: Final = "quantize"
    MUX: Final = "mux"


_BLOCK = re.compile(r"layer(\d+)(?:/(.+))?\Z")


@dataclasses.dataclass(frozen=True, order=True)
class BlockId:
    """A layer, or a block inside it: `layer3`, `layer3/attn`, `layer3/ffn/expert2`.

    `sub` is the path below the layer ("attn", "ffn", "skim", "norm", "ffn/expert2"),
    empty for the layer itself.
    """

    layer: int
    sub: str = ""

    def __str__(self) -> str:
        return f"layer{self.layer}/{self.sub}" if self.sub else f"layer{self.layer}"

    def child(self, name: str) -> BlockId:
        """Returns the block `name` below this one (`layer3` -> `layer3/attn`)."""
        return BlockId(self.layer, f"{self.sub}/{name}" if self.sub else name)

    @property
    def kind(self) -> str:
        """The first path element below the layer ("attn", "ffn", ...), or "" for a layer."""
        return self.sub.split("/", 1)[0]

    @staticmethod
    def parse(text: str) -> BlockId:
        """Reads a block id from its string form.

        Raises:
            ValueError: `text` is not `layer<N>` or `layer<N>/<path>`.
        """
        match = _BLOCK.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not a block id (layer<N> or layer<N>/<path>)")
        return BlockId(int(match.group(1)), match.group(2) or "")

    @staticmethod
    def try_parse(text: str | None) -> BlockId | None:
        """Reads a block id, or returns None where `text` is not one."""
        if not text:
            return None
        match = _BLOCK.match(text)
        return BlockId(int(match.group(1)), match.group(2) or "") if match else None


def attn(layer: int) -> BlockId:
    """Returns the id of layer `layer`'s attention block."""
    return BlockId(layer, "attn")


def ffn(layer: int) -> BlockId:
    """Returns the id of layer `layer`'s FFN block."""
    return BlockId(layer, "ffn")
