"""The torch mirror equals the compiled model in ORT, for every family, exporter and block kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from planer.compiler.driver.pipeline import compile_plan
from planer.compiler.loading import load_model
from planer.fixtures.build import example_inputs, fixture_path
from planer.recovery.runtime import Teacher, canonical_copy
from planer.recovery.structure import describe
from planer.recovery.train import Student, build_student

FAMILIES = ["bert", "bert-relu", "bert-gelu-tanh", "roberta", "xlm-roberta", "distilbert",
            "electra", "vit", "gpt2", "albert"]
EXPORTERS = ["dynamo", "torchscript"]
# Layer 0 keeps 2 of 4 heads and half its FFN; layer 1 drops its attention entirely.
REDUCED = {"layers": [{"heads": 2, "ffn": 64}, {"heads": 0, "ffn": 96}]}
DROP_FFN = {"layers": [{"heads": 3, "ffn": 0}, {"heads": 1, "ffn": 32}]}
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine


def _compiled(family: str, exporter: str, plan: dict | None, tmp_path: Path, *,
              ort_kernels: str = "on") -> Path:
    # ort_kernels "on": the model carries Sum and BiasGelu, which the mirror reads back.
    return compile_plan(fixture_path(family, exporter), tmp_path / "out", plan_data=plan,
                        ort_kernels=ort_kernels).model_path


def _feed(family: str) -> dict[str, np.ndarray]:
    # Row 1 is padded; ViT's sequence is its 16 patches + [CLS].
    return example_inputs(family, batch=3, seq=17 if family == "vit" else 20, seed=1)


def _student(path: Path) -> Student:
    return build_student(load_model(path), threads=1)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_mirror_equals_compiled_model(family: str, exporter: str, tmp_path: Path) -> None:
    # ALBERT's shared layer cannot be pruned per layer yet; its neutral plan still
    # re-emits every attention block.
    plan = None if family == "albert" else REDUCED
    path = _compiled(family, exporter, plan, tmp_path)
    student = _student(path)
    assert student.check(load_model(path), _feed(family)) <= ATOL
    teacher = Teacher(canonical_copy(load_model(fixture_path(family, exporter))))
    assert len(student.mirror.layer_names) == len(teacher.layers) == 2
    kinds = [kind for kind, _ in student.mirror.described if kind in ("attn", "ffn")]
    assert kinds == (["attn", "ffn", "attn", "ffn"] if plan is None else ["attn", "ffn", "ffn"])


@pytest.mark.parametrize("family", ["bert", "gpt2"])  # post-LN and pre-LN
def test_mirror_of_dropped_ffn(family: str, tmp_path: Path) -> None:
    # ort_kernels "off": the compile's kernel stage re-reads the model with find_blocks,
    # which refuses a layer without an FFN.
    path = _compiled(family, "dynamo", DROP_FFN, tmp_path, ort_kernels="off")
    student = _student(path)
    assert student.check(load_model(path), _feed(family)) <= ATOL
    blocks = [name for kind, name in student.mirror.described if kind in ("attn", "ffn")]
    assert blocks == ["layer0/attn", "layer1/attn", "layer1/ffn"]
    assert len(student.mirror.layer_names) == 2
    # The dropped FFN's constant bias is a trained tensor like any other bias.
    assert "layer0/ffn/dropped_bias" in student.mirror.trained()


def test_report_says_what_is_mirrored_and_frozen(tmp_path: Path) -> None:
    student = _student(_compiled("gpt2", "dynamo", REDUCED, tmp_path))
    parts = describe(student.stream)
    assert parts["mirrored"]["to"] == "last_hidden_state"  # type: ignore[index]
    assert parts["mirrored"]["norm"] == "pre"  # type: ignore[index]
    # ln_1, ln_2 of layer 0, ln_2 of layer 1 (its attention, and so ln_1, is dropped), ln_f.
    assert parts["mirrored"]["steps"]["LayerNormalization"] == 4  # type: ignore[index]
    frozen = parts["frozen_in_ort"]
    assert "embeddings" in frozen["before"]  # type: ignore[index]
    assert frozen["aux"]  # type: ignore[index]  # the causal + padding mask comes from ORT
    # Word embeddings are read before the stream only: never trained.
    assert not any("wte" in name for name in student.mirror.trained())


def test_perturbed_weight_fails_the_check(tmp_path: Path) -> None:
    path = _compiled("bert", "dynamo", REDUCED, tmp_path)
    student = _student(path)
    model = load_model(path)
    assert student.check(model, _feed("bert")) <= ATOL
    with torch.no_grad():
        student.mirror.trained()["layer0/attn/v/weight"][3, 5] += 0.05
    assert student.check(model, _feed("bert")) > ATOL


def test_wrong_head_count_fails_the_check(tmp_path: Path) -> None:
    path = _compiled("bert", "dynamo", REDUCED, tmp_path)
    student = _student(path)
    attn = next(m for m in student.mirror.blocks.values() if hasattr(m, "heads"))
    attn.heads, attn.head_size = attn.heads * 2, attn.head_size // 2  # same width, wrong split
    assert student.check(load_model(path), _feed("bert")) > ATOL


def test_shared_initializers_are_trained_once(tmp_path: Path) -> None:
    # ALBERT's layers share their LayerNorms: 4 LayerNorm steps read 2 (scale, bias) pairs,
    # which are trained as one tensor each.
    student = _student(_compiled("albert", "dynamo", None, tmp_path))
    norms = [m for m in student.mirror.blocks.values() if hasattr(m, "eps")]
    assert len(norms) == 4
    scales = {m.scale for m in norms} | {m.bias for m in norms}
    assert len(scales) == 4
    assert scales <= set(student.mirror.trained())
