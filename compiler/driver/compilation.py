"""The typed state one compile carries from stage to stage.

    CompileOptions (what the user asked) ─┐
    source model ─▶ read + canonicalize ──┼─▶ Compilation ─▶ stages ─▶ emit + verify
    calibration ─▶ Fitting (once) ────────┘      │
                                                 └─ .spec: block analysis, cached, dropped
                                                    whenever a stage modifies the graph

A `Fitting` (calibration set, captured activations, importance) depends only on the
source model and the calibration data, so the latency search computes it once and every
round's compile reuses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from planer.compiler.blocks import find_blocks
from planer.compiler.calibration import DEFAULT_SAMPLES, CalibrationSet
from planer.compiler.errors import BadInputError
from planer.compiler.plan import Plan
from planer.compiler.spec import ModelSpec
from planer.cost_model.kernels import KernelTimings
from planer.passes.prune_fit import LayerActivations

Progress = Callable[[str], None]

ORT_KERNELS = ("auto", "on", "off")
RUNTIMES = ("ort", "tensorrt")
REPORT_SCHEMA = 2  # bump when report.json changes shape
MUX_NEEDS_RECOVERY = ("mux mixes several inputs into one row and only a trained demux can "
                      "separate them (untrained, its outputs are garbage); add --recover TIME.")


def check_calibration_samples(samples: int) -> None:
    """Refuses a calibration sample count that leaves nothing to fit or nothing held out."""
    if samples < 2:
        raise BadInputError(f"--calibration-samples must be at least 2 (one to fit, one held "
                            f"out), not {samples}.")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What the user asked for: everything a compile reads besides the model and its data."""

    plan_data: dict[str, Any] | None = None
    target_flops: float | None = None
    calibration: Path | None = None
    calibration_samples: int = DEFAULT_SAMPLES  # read from `calibration`, a quarter held out
    tokenizer: Path | None = None
    batch: int = 1
    seq_len: int = 128
    reconstruct: bool = True
    method: str = "calibrated"
    passes: frozenset[str] = frozenset({"prune"})
    target_runtime: str = "ort"
    threads: int = 1
    ort_kernels: str = "auto"
    recover_seconds: float | None = None
    recover_steps: int | None = None
    mux: int = 1  # instances per backbone row (`--mux`, passes.mux); needs recovery
    moe_activation: str | None = None  # "relu": ReLU-fied experts in every MoE layer

    def check(self) -> None:
        """Refuses contradictory or out-of-range options in one sentence.

        Raises:
            BadInputError: the options cannot be used together or as given.
        """
        if self.plan_data is not None and self.target_flops is not None:
            raise BadInputError("give either --plan or --target-flops, not both.")
        if self.target_flops is not None and not 0.0 < self.target_flops <= 1.0:
            raise BadInputError(f"--target-flops must be in (0, 1], not {self.target_flops}.")
        if self.ort_kernels not in ORT_KERNELS:
            raise BadInputError(f"--ort-kernels must be one of {', '.join(ORT_KERNELS)}, "
                                f"not {self.ort_kernels!r}.")
        if self.target_runtime not in RUNTIMES:
            raise BadInputError(f"--target-runtime must be one of {', '.join(RUNTIMES)}, "
                                f"not {self.target_runtime!r}.")
        if self.mux not in (1, 2, 4):
            raise BadInputError(f"--mux must be 1, 2 or 4, not {self.mux}.")
        if self.mux > 1 and not self.recovers:
            raise BadInputError(MUX_NEEDS_RECOVERY)
        check_calibration_samples(self.calibration_samples)
        if self.moe_activation not in (None, "relu"):
            raise BadInputError(f"--moe-activation must be relu, not {self.moe_activation!r}.")
        if self.moe_activation and self.plan_data is None and "moe" not in self.passes:
            raise BadInputError("--moe-activation changes MoE experts; give a plan with moe "
                                "layers or --passes moe.")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def recovers(self) -> bool:
        return bool(self.recover_seconds) or bool(self.recover_steps)


@dataclasses.dataclass
class Fitting:
    """Calibration data and what was measured on the source model with it.

    Computed once per source model and calibration set; the latency search's rounds all
    reuse it (each round compiles another plan of the same model).
    """

    calib: CalibrationSet
    acts: list[LayerActivations] | None = None


@dataclasses.dataclass
class Report:
    """report.json, section by section; `to_dict` gives the JSON (schema REPORT_SCHEMA).

    `static` is the plan as applied with parameters and FLOPs (pipeline.build_report);
    each stage that runs adds its own section under its name; `verification`,
    `fidelity` and the latency search's summary are added when the model is measured.
    """

    static: dict[str, Any] = dataclasses.field(default_factory=dict)
    fit_records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    sections: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, name: str, section: Any) -> None:
        """Records one stage's section (a later stage of the same name replaces it)."""
        if section is not None:
            self.sections[name] = section

    def to_dict(self) -> dict[str, Any]:
        data = {"schema": REPORT_SCHEMA, **self.static}
        layers = data.get("layers", [])
        for layer, record in zip(layers, self.fit_records, strict=False):
            layer.update({k: v for k, v in record.items() if k != "index"})
        data.update(self.sections)
        return data


@dataclasses.dataclass
class Compilation:
    """One compile in flight: the graph being rewritten and everything the stages share."""

    source: Path
    options: CompileOptions
    model: ir.Model
    plan: Plan
    source_spec: ModelSpec  # the model as read, before any stage (the report's "before")
    fitting: Fitting | None = None
    selection: Any = None  # compiler.driver.prune.Selection, once the units are chosen
    report: Report = dataclasses.field(default_factory=Report)
    # Kernel timings (passes.ort_kernels, MoE lowering): one object per compile, shared
    # by the latency search's rounds so each shape is timed once.
    kernels: KernelTimings = dataclasses.field(default_factory=KernelTimings)
    progress: Progress = lambda _msg: None
    _spec: ModelSpec | None = None

    def __post_init__(self) -> None:
        self._spec = self.source_spec

    @property
    def spec(self) -> ModelSpec:
        """The block analysis of the graph as it is now (found again after any rewrite)."""
        if self._spec is None:
            self._spec = find_blocks(self.model)
        return self._spec

    def modified(self) -> None:
        """Drops the cached block analysis: a stage changed the graph."""
        self._spec = None

    @property
    def calib(self) -> CalibrationSet | None:
        return self.fitting.calib if self.fitting is not None else None
