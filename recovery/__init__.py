"""Recovery: label-free distillation of a compiled model from the original (torch)."""
