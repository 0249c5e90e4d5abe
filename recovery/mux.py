"""Recovery of a multiplexed model (passes.mux): backbone mirror, torch demux, per-instance loss.

Dimensions: B batch, S sequence, D model width, N instances per group, G groups, H demux
hidden width, L layers.

    feed (B rows) ─ Prefix (ORT: embeddings, mux, union masks) ─ x_GSD, masks_G..
                  ─ Mirror (the backbone, torch) ─ h_GSD (+ layers s_l, G rows)
                  ─ Demux (torch, the graph's weights by name) ─ y_BSD
    feed ─ Teacher (the original, ORT: every instance alone) ─ t_BSD (+ layers t_l, B rows)

    loss = Σ_b ||y_b − t_b||² / Σ_b ||t_b||²   (over each instance's own real tokens)
         + (1 − cos(mean-pool y_b, mean-pool t_b))
         (+ aux_weight · Σ_l ||s_l − mean_i(v_i ⊙ t_l,i)||² / ||·||²: the backbone's layer
            states against the keyed mean of its members' states, on the group's union mask)

Layer-wise targets of a mixture do not exist (the original never saw one), so the output
loss carries the signal; the optional auxiliary term asks every layer to stay what the
mux itself does to the embeddings, a keyed mean of the members' states (measured with
`benchmarks/bench_mux.py`; see the README for whether it helped). The trained tensors
(backbone and demux, initializers by name) are written back like the rest of recovery.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch import nn
from torch.nn import functional as F

from planer.compiler.errors import UnsupportedModelError
from planer.compiler.names import PROVENANCE_BLOCK, PROVENANCE_PASS, PassName
from planer.recovery.mirror import Mirror, MirrorOutput, WeightStore
from planer.recovery.runtime import Prefix, TeacherOutput, canonical_copy
from planer.recovery.structure import read_stream

if TYPE_CHECKING:
    from planer.recovery.train import Student

DEMUX_WEIGHTS = ("w1h", "w1p", "instances", "b1", "w2", "b2")
AUX_WEIGHT = 0.0  # the auxiliary layer term's weight (0: output loss only)


def has_mux(model: ir.Model) -> bool:
    """Whether passes.mux rewrote `model`."""
    return any(node.metadata_props.get(PROVENANCE_PASS) == PassName.MUX for node in model.graph)


@dataclasses.dataclass(frozen=True)
class MuxParts:
    """Where the mux sits in a graph: its keys, the demux block and the backbone's end h."""

    keys: np.ndarray  # [N, 1, D]
    demux_block: str
    hidden: ir.Value


def find_parts(model: ir.Model) -> MuxParts:
    """Reads the mux keys and the demux's block and input from provenance metadata.

    Raises:
        UnsupportedModelError: the mux nodes are not the ones passes.mux emits.
    """
    blocks = {node.metadata_props.get(PROVENANCE_BLOCK, "") for node in model.graph
              if node.metadata_props.get(PROVENANCE_PASS) == PassName.MUX}
    mux = next((b for b in blocks if b.endswith("/mux")), None)
    demux = next((b for b in blocks if b.endswith("/demux")), None)
    first = next((n for n in model.graph if n.name == f"{demux}/w1h/MatMul"), None)
    keys = model.graph.initializers.get(f"{mux}/keys")
    if first is None or first.inputs[0] is None or keys is None or keys.const_value is None:
        raise UnsupportedModelError("the mux nodes cannot be read back (no keys or demux).")
    return MuxParts(keys.const_value.numpy(), str(demux), first.inputs[0])


class Demux(nn.Module):
    """The graph's demux: relu(h·w1h + p_i·w1p + b1)·w2 + b2 for each of the N slots."""

    def __init__(self, store: WeightStore, model: ir.Model, block: str):
        super().__init__()
        self.store = [store]
        self.names = {}
        for key in DEMUX_WEIGHTS:
            value = model.graph.initializers.get(f"{block}/{key}")
            if value is None:
                raise UnsupportedModelError(f"the demux has no initializer {block}/{key}.")
            self.names[key] = store.add(value, trainable=True)

    def forward(self, h: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Returns the first `rows` (default all) of the N·G restored rows from h [G, S, D]."""
        w = {k: self.store[0].get(name) for k, name in self.names.items()}
        slots = w["instances"] @ w["w1p"] + w["b1"]  # [N, H]
        act = F.relu((h @ w["w1h"])[:, None] + slots[None, :, None, :])  # [G, N, S, H]
        y = act @ w["w2"] + w["b2"]
        return y.reshape(-1, *h.shape[1:])[:rows]


class MuxMirror(nn.Module):
    """The backbone's mirror followed by the demux: B rows in (as masks), B rows out.

    `layer_names` are the backbone's, so the trainer keeps the teacher's layer outputs
    for `MuxLoss`; the layers it returns hold G rows (group states), not B.
    """

    def __init__(self, backbone: Mirror, demux: Demux):
        super().__init__()
        self.backbone, self.demux = backbone, demux
        self.store = backbone.store
        self.layer_names = backbone.layer_names
        self.frozen_shared = backbone.frozen_shared

    def forward(self, entry: torch.Tensor, aux: dict[str, torch.Tensor],
                mask: torch.Tensor | None = None) -> MirrorOutput:
        """Runs the group rows `entry` [G, S, D]; `mask` [B, S] gives B (all G·N without)."""
        out = self.backbone(entry, aux, None)
        rows = mask.shape[0] if mask is not None else None
        return MirrorOutput(self.demux(out.end, rows), out.layers, out.aux_loss)

    def trained(self) -> dict[str, torch.Tensor]:
        return self.store.trained()


@dataclasses.dataclass
class MuxLoss:
    """Scores every instance's restored output against the original run on it alone."""

    keys: torch.Tensor  # [N, 1, D]
    aux_weight: float = AUX_WEIGHT

    def __call__(self, out: MirrorOutput, teacher: TeacherOutput, mask: torch.Tensor,
                 config: Any, scales: Sequence[float] | None, *, tokens: float,
                 sequences: float) -> Any:
        from planer.recovery.train import LossTerms, pooled

        m = mask[..., None]
        end = torch.from_numpy(teacher.end)
        token = ((out.end - end) ** 2 * m).sum() / ((end ** 2) * m).sum().clamp_min(1e-12)
        cos = F.cosine_similarity(pooled(out.end, mask), pooled(end, mask), dim=-1)
        output = config.output_weight * (1.0 - cos).sum() / sequences \
            + config.layer_weight * token
        layer = torch.zeros(())
        if self.aux_weight > 0 and out.layers and teacher.layers:
            layer = self.aux_weight * self._layers(out.layers, teacher.layers, mask)
        total = output + layer
        return LossTerms(total, float(layer.detach()), float(output.detach()))

    def _layers(self, student: list[torch.Tensor], teacher: list[np.ndarray],
                mask: torch.Tensor) -> torch.Tensor:
        """Relative MSE of each layer's group state to the keyed mean of its members'."""
        n = self.keys.shape[0]
        union = group(mask, n).amax(dim=1)[..., None]  # [G, S, 1]
        loss = torch.zeros(())
        for s, t in zip(student, teacher, strict=True):
            target = (group(torch.from_numpy(t), n) * self.keys).mean(dim=1)
            loss = loss + ((s - target) ** 2 * union).sum() / \
                ((target ** 2) * union).sum().clamp_min(1e-12)
        return loss / max(len(student), 1)


def group(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pads rows by repeating the last (as the graph does) and reshapes to [G, N, ...]."""
    rows = -(-x.shape[0] // n) * n
    index = torch.clamp(torch.arange(rows), max=x.shape[0] - 1)
    return x[index].reshape(-1, n, *x.shape[1:])


def build_mux_student(model: ir.Model, threads: int) -> Student:
    """Builds the Student of a mux model: the backbone cut at the demux, plus the demux."""
    from planer.recovery.train import Student

    canonical = canonical_copy(model)
    parts = find_parts(canonical)
    backbone = ir.from_proto(ir.to_proto(canonical))
    hidden = backbone.graph.node(f"{parts.demux_block}/w1h/MatMul").inputs[0]
    assert hidden is not None
    backbone.graph.outputs.clear()
    backbone.graph.outputs.append(hidden)
    RemoveUnusedNodesPass()(backbone)
    stream = read_stream(backbone)
    mirror = Mirror(stream)
    demux = Demux(mirror.store, canonical, parts.demux_block)
    # MuxMirror answers what the trainer asks of a Mirror (forward, trained, layer_names,
    # frozen_shared), with B rows out of G.
    student = Student(backbone, stream, cast(Mirror, MuxMirror(mirror, demux)),
                      Prefix(backbone, stream, threads=threads), threads)
    student.loss = MuxLoss(torch.from_numpy(parts.keys.copy()), aux_weight=AUX_WEIGHT)
    return student
