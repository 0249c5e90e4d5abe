"""Token skimming on a model without an attention mask (ViT: every patch is real)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from planer import api
from planer.fixtures.build import fixture_path


def test_vit_skims_patches_with_calibration(tmp_path: Path) -> None:
    source = fixture_path("vit")
    pixels = onnx.load(str(source), load_external_data=False).graph.input[0]
    shape = [d.dim_value or 8 for d in pixels.type.tensor_type.shape.dim]
    calibration = tmp_path / "pixels.npz"
    np.savez(calibration, **{pixels.name: np.random.default_rng(0)
                             .standard_normal(shape).astype(np.float32)})
    api.compile(source, out=tmp_path / "out", calibration=calibration,
                plan={"layers": [{}, {"skim_keep": 0.5}]}, ort_kernels="off")
    skim = json.loads((tmp_path / "out" / "report.json").read_text())["skim"]
    patches = (shape[2] // 8) * (shape[3] // 8) + 1  # 8x8 patches and [CLS], all real
    assert skim["mean_real_tokens"] == patches
    assert skim["mean_kept_tokens_per_layer"] == [patches, np.ceil(patches / 2)]
