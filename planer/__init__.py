"""planer: a compiler that rewrites Transformer ONNX models to meet a latency target."""

__version__ = "0.1.0"
