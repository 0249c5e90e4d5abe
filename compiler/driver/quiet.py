"""Keeps other libraries' chatter off planer's output while planer calls them.

What it silences, and how (each restored when the block ends; nothing is patched):

    torch exporter        "torchvision is not installed. Skipping torchvision::nms"
                          ─ logger `torch.onnx` raised to ERROR
    transformers          "Loading weights: 100%|███| 103/103" (tqdm)
                          ─ transformers.utils.logging.disable_progress_bar()
    onnx-ir, onnxscript   graph warnings planer already turns into its own sentence
                          ─ their loggers raised to ERROR
    Python warnings       DeprecationWarning/UserWarning raised inside those libraries
                          ─ warnings.catch_warnings() ignoring their modules

With `verbose`, nothing is silenced: `planer -v` shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

LIBRARIES = ("torch", "transformers", "onnxscript", "onnx_ir", "onnx", "onnxruntime",
             "huggingface_hub", "tokenizers")
_LOUD_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "transformers", "onnxscript",
                 "onnx_ir", "huggingface_hub")


@contextlib.contextmanager
def quiet_libraries(*, verbose: bool = False, export: bool = False) -> Iterator[None]:
    """Silences other libraries' warnings, log lines and progress bars inside the block.

    Args:
        verbose: silence nothing (the CLI's `-v`).
        export: the block exports a model with torch and transformers (the bundled model
            on first use): import both first, since importing torch resets the levels of
            its loggers (`torch._logging`), and transformers' bars are switched off.
    """
    if verbose:
        yield
        return
    if export:
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401 (its import-time logging set-up must come first)
    with warnings.catch_warnings(), _quiet_loggers(), _no_transformers_bars(export):
        for library in LIBRARIES:
            warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")
        yield


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _LOUD_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _no_transformers_bars(load: bool) -> Iterator[None]:
    if not load and "transformers" not in sys.modules:
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the export extra is not installed: nothing to silence
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
