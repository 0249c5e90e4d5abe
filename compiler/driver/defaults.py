"""What a command falls back on when the user names nothing: bundled model, tokenizer, text.

    MODEL omitted         ─▶ all-MiniLM-L6-v2 (exported to ONNX on first use, cached)
    --tokenizer omitted   ─▶ its tokenizer, when the model is the bundled one
    --calibration omitted ─▶ planer/data/calibration_en.txt (3,000 English sentences, WordNet
                             3.0 usage examples; source and licence in CALIBRATION_SOURCE.md)
                             when a plan is chosen or fitted and a tokenizer is known

The CLI and the Python API both resolve their arguments here, so they agree.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from planer.compiler.driver.quiet import quiet_libraries
from planer.compiler.errors import PlanerError

CALIBRATION_FILE = "calibration_en.txt"
CALIBRATION_NOTE = ("no --calibration: calibrating on planer's bundled English sentences "
                    "(3,000 WordNet 3.0 usage examples)")


def bundled_calibration() -> Path:
    """Returns the path of the bundled English calibration text (one sentence a line)."""
    return Path(str(importlib.resources.files("planer").joinpath("data", CALIBRATION_FILE)))


def bundled_model(*, verbose: bool = False) -> Path:
    """Returns the bundled all-MiniLM-L6-v2, exported quietly and cached on first use.

    Raises:
        PlanerError: the export extras (torch, transformers, the model package) are missing.
    """
    try:
        from planer.fixtures.build import minilm_path
    except ImportError as exc:
        raise PlanerError(
            "the bundled model needs the export extras; install with "
            "`pip install -e .[export]` or pass a model file."
        ) from exc
    with quiet_libraries(verbose=verbose, export=True):
        return minilm_path("dynamo")


def bundled_tokenizer() -> Path:
    """Returns the bundled model's tokenizer folder."""
    from planer.fixtures.build import minilm_tokenizer_dir

    return minilm_tokenizer_dir()


def default_calibration(calibration: Path | None, tokenizer: Path | None, *,
                        fits: bool) -> Path | None:
    """Returns `calibration`, or the bundled text where a tokenizer reads it and a plan is fit.

    Args:
        calibration: what the user gave (None: nothing).
        tokenizer: the tokenizer the compile will use (None: unknown, so text is unusable).
        fits: whether the compile chooses or fits anything from calibration (a plan or a
            target); the neutral plan only measures fidelity, and gets no default.
    """
    if calibration is not None or tokenizer is None or not fits:
        return calibration
    return bundled_calibration()
