"""The compile stages, and the small runner that executes them in order.

A stage reads and rewrites one `Compilation`: `applies` says whether the plan and
options ask for it, `requires` refuses (with a sentence a user can act on) what it
cannot do, and `run` rewrites the graph and returns whether it changed. The runner
keeps planer's errors as they are (sentence and exit code: no wrapping in a generic
pass error) and checks after every rewrite that the stage left no dead nodes behind,
instead of repairing the graph after it. The list itself lives in `pipeline.STAGES`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from planer.compiler.blocks import find_blocks
from planer.compiler.calibration import read_texts
from planer.compiler.driver.compilation import MUX_NEEDS_RECOVERY, Compilation
from planer.compiler.driver.planning import choose_units, skim_layers
from planer.compiler.errors import BadInputError, PlanerError
from planer.compiler.irutil import is_dead
from planer.compiler.names import PassName
from planer.cost_model.kernels import KernelTimings
from planer.passes.channel_pruning import ChannelPruningConfig, apply_channel_pruning
from planer.passes.ffn_to_moe import (
    apply_ffn_to_moe,
    choose_lowering,
    config_from_fits,
    expert_activation,
    kernel_fits,
)
from planer.passes.head_pruning import HeadPruningConfig, apply_head_pruning
from planer.passes.moe_fit import fit_layers
from planer.passes.mux import MuxConfig, apply_mux
from planer.passes.ort_kernels import OrtKernelsConfig, apply_ort_kernels
from planer.passes.skim_fit import fit_context, fit_forward, fit_predictors, skim_report
from planer.passes.skim_forward import has_context
from planer.passes.token_skim import TokenSkimConfig, apply_token_skim

logger = logging.getLogger(__name__)


class Stage:
    """One step of the compile; subclasses set `name` and override what they need."""

    name: str = ""

    def applies(self, c: Compilation) -> bool:
        """Whether the plan and options ask for this stage."""
        return True

    def requires(self, c: Compilation) -> None:
        """Raises a PlanerError with a sentence when the stage cannot run on `c`."""

    def describe(self, c: Compilation) -> str:
        """The progress line shown while the stage runs."""
        return self.name.replace("_", " ")

    def run(self, c: Compilation) -> bool:
        """Runs the stage; returns whether the graph changed."""
        raise NotImplementedError


def run_stages(stages: Sequence[Stage], c: Compilation) -> None:
    """Runs each stage that applies, in order, keeping planer's errors intact."""
    for stage in stages:
        if not stage.applies(c):
            continue
        stage.requires(c)
        c.progress(stage.describe(c))
        try:
            modified = stage.run(c)
        except PlanerError:
            raise
        except Exception as exc:
            exc.add_note(f"(in planer's {stage.name} stage)")
            raise
        if modified:
            c.modified()
            dead = dead_nodes(c.model.graph)
            if dead:
                raise AssertionError(f"the {stage.name} stage left {len(dead)} dead nodes "
                                     f"behind, e.g. {dead[0].name!r}")


def dead_nodes(graph: ir.Graph) -> list[ir.Node]:
    """Returns the nodes none of whose outputs is read or is a graph output."""
    return [node for node in graph if is_dead(node)]


class ChooseUnits(Stage):
    """Settles the plan (FLOPs target) and which heads and channels each layer keeps."""

    name = "choose_units"

    def describe(self, c: Compilation) -> str:
        return "choosing what each layer keeps"

    def run(self, c: Compilation) -> bool:
        c.plan, c.selection, c.report.fit_records = choose_units(c)
        return False


class Prune(Stage):
    """Re-emits attention with its kept heads, then slices each FFN to its kept channels.

    One stage, one spec: channel pruning touches only FFN blocks, which the attention
    rewrite leaves as they were, and a layer whose heads are all dropped has no attention
    left for the finder to anchor on, so the spec is not found again in between.
    """

    name = "prune"

    def describe(self, c: Compilation) -> str:
        return "rewriting layers"

    def run(self, c: Compilation) -> bool:
        s, spec = c.selection, c.spec
        heads = apply_head_pruning(c.model, spec, HeadPruningConfig(s.heads, s.head_output))
        channels = apply_channel_pruning(c.model, spec,
                                         ChannelPruningConfig(s.channels, s.channel_output))
        return heads + channels > 0


class FfnToMoe(Stage):
    """Splits the planned FFNs into experts with fitted routers (DSTI/MoEfication)."""

    name = PassName.FFN_TO_MOE

    def applies(self, c: Compilation) -> bool:
        return any(la.moe is not None for la in c.plan.layers)

    def requires(self, c: Compilation) -> None:
        if c.calib is None:
            first = next(i for i, la in enumerate(c.plan.layers) if la.moe is not None)
            raise BadInputError(f"plan layer {first} sets moe, whose routers are fitted on "
                                "calibration data; pass --calibration.")

    def describe(self, c: Compilation) -> str:
        return "splitting FFNs into experts and fitting routers"

    def run(self, c: Compilation) -> bool:
        assert c.calib is not None  # requires() refused otherwise
        o = c.options
        if o.moe_activation is not None:  # --moe-activation: every MoE layer of the plan
            c.plan = dataclasses.replace(c.plan, layers=tuple(
                dataclasses.replace(la, moe=dataclasses.replace(la.moe,
                                                                activation=o.moe_activation))
                if la.moe is not None else la for la in c.plan.layers))
        if any(la.moe.activation == "relu" for la in c.plan.layers if la.moe is not None) \
                and not o.recovers:
            # Warned, not refused: the untrained rewrite is worth measuring on its own.
            logger.warning("ReLU-fied experts run ReLU in place of the FFN's activation without "
                           "training, which loses quality; add --recover TIME to train them.")
        info = apply_moe(c.model, c.spec, c.plan, c.calib, lowering=o.target_runtime,
                         tokens=o.tokens, threads=o.threads, measure=o.ort_kernels == "auto",
                         kernels=c.kernels)
        c.report.add("moe", info)
        return bool(info)


class TokenSkim(Stage):
    """Removes skimmed tokens before the planned layers (Transkimmer)."""

    name = PassName.TOKEN_SKIM

    def applies(self, c: Compilation) -> bool:
        return bool(skim_layers(c.plan))

    def requires(self, c: Compilation) -> None:
        if any(la.moe is not None for la in c.plan.layers):
            raise BadInputError("a plan cannot combine moe and skim_keep yet; the skim pass "
                                "cannot read MoE layers.")
        if 0 in skim_layers(c.plan) and c.calib is None:
            raise BadInputError("skim_keep before layer 0 needs a fitted predictor (there is "
                                "no earlier attention to score tokens by); pass --calibration.")

    def describe(self, c: Compilation) -> str:
        return "fitting skim predictors and removing skimmed tokens"

    def run(self, c: Compilation) -> bool:
        c.report.add("skim", apply_skim(c, lowering=c.options.target_runtime))
        return True


class OrtKernels(Stage):
    """Steers ONNX Runtime's kernel choices where they measured badly (passes.ort_kernels)."""

    name = PassName.ORT_KERNELS

    def applies(self, c: Compilation) -> bool:
        return c.options.target_runtime == "ort" and c.options.ort_kernels != "off"

    def describe(self, c: Compilation) -> str:
        if c.options.ort_kernels == "auto":
            return "choosing ORT kernels (timing fused vs unfused residual LayerNorm)"
        return "choosing ORT kernels"

    def run(self, c: Compilation) -> bool:
        o = c.options
        # The width is the source's: ORT kernels never change it, and a layer whose heads
        # were all dropped has no attention left for the finder to anchor on.
        info = tune_ort_kernels(c.model, c.source_spec.hidden, tokens=o.tokens,
                                threads=o.threads, measure=o.ort_kernels == "auto",
                                kernels=c.kernels)
        c.report.add("ort_kernels", info)
        return True


class Mux(Stage):
    """Mixes N instances per backbone row and restores them with demux heads (DataMUX)."""

    name = PassName.MUX

    def applies(self, c: Compilation) -> bool:
        return max(c.options.mux, c.plan.mux) > 1

    def requires(self, c: Compilation) -> None:
        o, plan = c.options, c.plan
        if o.mux > 1 and plan.mux > 1 and o.mux != plan.mux:
            raise BadInputError(f"--mux {o.mux} contradicts the plan's mux {plan.mux}.")
        if not o.recovers:
            raise BadInputError(MUX_NEEDS_RECOVERY)
        if skim_layers(plan) or any(la.moe is not None for la in plan.layers):
            raise BadInputError("mux cannot be combined with skim_keep or moe yet (recovery "
                                "does not mirror skimming; MoE under mux is untested).")

    def describe(self, c: Compilation) -> str:
        return f"multiplexing {max(c.options.mux, c.plan.mux)} inputs per row"

    def run(self, c: Compilation) -> bool:
        n = max(c.options.mux, c.plan.mux)
        c.plan = dataclasses.replace(c.plan, mux=n)  # plan.json records what was applied
        # The source spec: layer 0's input and the width are the embeddings', which no
        # earlier stage rewrites (the finder may not read a pruned layer back).
        changed = apply_mux(c.model, c.source_spec, MuxConfig(n=n))
        c.report.add("mux", {"n": n, "keys": "seeded unit Gaussian (seed 0)",
                             "demux": "MLP([h ; p_i]), ReLU, hidden = model width"})
        return changed > 0


class Recover(Stage):
    """Distils the original model into the rewritten one on calibration text (recovery/)."""

    name = PassName.RECOVER

    def applies(self, c: Compilation) -> bool:
        return c.options.recovers

    def requires(self, c: Compilation) -> None:
        from planer.recovery.distill import check_inputs

        o = c.options
        check_inputs(c.calib, o.recover_seconds, o.recover_steps, None, None)

    def describe(self, c: Compilation) -> str:
        o = c.options
        budget = [f"{o.recover_seconds:g} s" if o.recover_seconds else "",
                  f"{o.recover_steps} steps" if o.recover_steps else ""]
        return f"recovering by distillation from the original ({', '.join(b for b in budget if b)})"

    def run(self, c: Compilation) -> bool:
        from planer.passes.quantize import dynamic_int8_weights
        from planer.recovery.distill import recover

        o = c.options
        texts = read_texts(o.calibration) if o.calibration is not None \
            and _is_text(o.calibration) else None
        # The int8 stage comes after this one; the mirror simulates its rounding so the
        # weights trained here are the ones that quantize well. Resolved as that stage
        # resolves them (the source spec: the finder refuses MoE layers).
        int8 = dynamic_int8_weights(c.model, c.source_spec, c.plan)
        result = recover(c.source, c.model, c.calib, budget_s=o.recover_seconds,
                         max_steps=o.recover_steps, progress=c.progress, texts=texts,
                         tokenizer=o.tokenizer if texts is not None else None,
                         int8_weights=int8)
        c.report.add("recovery", result.to_dict())
        # Weights only: names, shapes and every node are as before (recover checks it), so
        # the block analysis still holds.
        return False


class Int8(Stage):
    """Quantizes the blocks the plan marks int8 through onnxruntime.quantization."""

    name = PassName.QUANTIZE

    def applies(self, c: Compilation) -> bool:
        return any(la.int8 is not None for la in c.plan.layers)

    def describe(self, c: Compilation) -> str:
        return "quantizing blocks to int8 (onnxruntime.quantization)"

    def run(self, c: Compilation) -> bool:
        from planer.passes.quantize import apply_int8

        # The source spec: FFN MatMuls are the nodes it names (pruning keeps them) and
        # attention is found by the names head pruning gave it; the finder cannot read the
        # graph again after ORT's kernel spelling (Sum, BiasGelu).
        info = apply_int8(c.model, c.source_spec, c.plan, c.calib,
                          target=c.options.target_runtime)
        c.report.add("int8", info)
        return bool(info)


def _is_text(path: Any) -> bool:
    return path is not None and str(path).lower().endswith((".txt", ".tsv", ".csv", ".jsonl"))


# What `--passes` names: the stages a FLOPs or latency target may plan for. INT8 leaves
# FLOPs alone, so a FLOPs target ignores it (planning.flops_passes); a latency search
# weighs it only when named.
PASS_GROUPS: dict[str, tuple[type[Stage], ...]] = {
    "prune": (Prune,),
    "int8": (Int8,),
    "moe": (FfnToMoe,),
    "skim": (TokenSkim,),
}


def tune_ort_kernels(model: ir.Model, width: int, *, tokens: int, threads: int,
                     measure: bool = True, kernels: KernelTimings | None = None) -> dict[str, Any]:
    """Runs passes.ort_kernels on `model`; with `measure`, only where this machine gains."""
    info: dict[str, Any] = {}
    unfuse = True
    if measure:
        choice = (kernels or KernelTimings()).skip_layernorm(width, tokens, threads)
        info["skip_layernorm"] = {"tokens": tokens, "threads": threads, **choice.to_dict()}
        unfuse = choice.unfuse
    info.update(apply_ort_kernels(model, OrtKernelsConfig(unfuse_skip_layernorm=unfuse)))
    return info


def apply_moe(model: ir.Model, spec: Any, plan: Any, calib: Any, *, lowering: str,
              tokens: int, threads: int = 1, measure: bool = False,
              kernels: KernelTimings | None = None) -> dict[str, Any]:
    """Splits the planned FFNs into experts with fitted routers; returns per-layer quality.

    Runs after pruning, so experts split the pruned width. For the ort target with
    `measure`, layers that com.microsoft.MoE computes exactly (static top-k, relu or
    tanh-GELU) take whichever of it and the gather chain measured faster here at
    `tokens` and `threads`; the others, and every layer without `measure`, use gather.
    """
    wanted = {i: la.moe for i, la in enumerate(plan.layers) if la.moe is not None}
    fitted = fit_layers(model, spec, calib, {i: p.experts for i, p in wanted.items()},
                        activations={i: p.activation for i, p in wanted.items() if p.activation})
    config = config_from_fits(fitted, wanted, target=lowering, tokens=tokens)
    info = {f"layer{i}": fitted[i].quality(p).to_dict() for i, p in wanted.items()}
    if lowering == "ort":
        layers = dict(config.layers)
        for layer in spec.layers:
            moe = layers.get(layer.index)
            if moe is None:
                continue
            record = info[f"layer{layer.index}"]
            activation = expert_activation(layer.ffn, moe)
            if measure and kernel_fits(activation, moe.top_k):
                costs = (kernels or KernelTimings()).moe_lowering(
                                           layer.ffn.w1.in_features, layer.ffn.width,
                                           moe.experts.shape[0], int(moe.top_k or 0),
                                           activation, tokens, threads)
                moe = layers[layer.index] = dataclasses.replace(moe, lowering=costs.lowering)
                record["lowering_us"] = {k: v for k, v in costs.to_dict().items()
                                         if k != "lowering"}
            # What the rewrite will emit, from the rule it uses.
            record["lowering"] = choose_lowering(layer.ffn, moe, config)
        config = dataclasses.replace(config, layers=layers)
    apply_ffn_to_moe(model, spec, config)
    return info


def apply_skim(c: Compilation, *, lowering: str) -> dict[str, Any]:
    """Skims tokens where the plan says, with fitted predictors when calibration exists.

    Runs after pruning (it reads the re-emitted attention). Returns predictor fit records.
    """
    layers = skim_layers(c.plan)
    skim_keep = [la.skim_keep for la in c.plan.layers]
    predictors: dict[int, Any] = {}
    forward: dict[int, Any] = {}
    records: dict[str, Any] = {}
    choice: dict[str, Any] = {}
    if c.calib is not None:
        # Skimmed rows reach the output through a fitted map (passes/skim_forward.py); the
        # predictor keeps the tokens that map would forward worst ("residual"). The maps
        # refitted on the rows the predictor skims, with the kept rows' mean as a second
        # input, replace them only where the skimmed model's held-out pooled cosine says so.
        forward, maps = fit_forward(c.model, c.spec, layers, c.calib.batches, c.calib.holdout)
        fit = fit_predictors(c.model, c.spec, layers, c.calib.batches, target="residual",
                             forward=forward)
        predictors = dict(fit.predictors)
        keep = {i: float(c.plan.layers[i].skim_keep or 1.0) for i in layers}
        context, refits = fit_context(c.model, c.spec, keep, predictors, c.calib.batches,
                                      c.calib.holdout, fallback=forward)
        records = {f"layer{i}": {"mse_before": round(fit.train_loss[i][0], 4),
                                 "mse_after": round(fit.train_loss[i][1], 4),
                                 "mse_holdout": round(fit.holdout_loss[i], 4),
                                 "forward": maps[i], "forward_skimmed": refits[i]}
                   for i in layers}
        if has_context(context):
            candidates = {name: TokenSkimConfig.from_plan(skim_keep, predictors=predictors,
                                                          forward=f, lowering=lowering)
                          for name, f in (("linear", forward), ("context", context))}
            choice = _measured_choice(c, candidates, layers)
            forward = context if choice["kept"] == "context" else forward
    config = TokenSkimConfig.from_plan(skim_keep, predictors=predictors, forward=forward,
                                       lowering=lowering)
    apply_token_skim(c.model, c.spec, config)
    return {"predictors": records, "score": "fitted" if predictors else "attention",
            "lowering": lowering, **({"forward_choice": choice} if choice else {})}


def _measured_choice(c: Compilation, candidates: dict[str, TokenSkimConfig],
                     layers: Sequence[int]) -> dict[str, Any]:
    """Skims a copy of the model per candidate; keeps the best held-out pooled cosine.

    The dense model's rows stand in for the skimmed model's when the maps are fitted;
    only the skimmed model itself says which maps serve its output best. Returns each
    candidate's cosine and the one kept.
    """
    assert c.calib is not None
    c.progress("measuring the skimmed model with each forwarding map")
    scores = {}
    for name, config in candidates.items():
        trial = ir.from_proto(ir.to_proto(c.model))
        apply_token_skim(trial, find_blocks(trial), config)
        report = skim_report(c.model, trial, layers, c.calib.holdout,
                             num_layers=len(c.spec.layers))
        pooled = report["pooled_cosine"]
        assert isinstance(pooled, dict)
        scores[name] = round(float(pooled["mean"]), 4)
    return {"holdout_pooled_cosine": scores, "kept": max(scores, key=lambda k: scores[k])}
