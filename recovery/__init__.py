"""Recovery: label-free distillation of a compiled model from the original (torch).

Modules, in processing order:

- structure: the compiled model's residual stream (finder blocks + stream ops)
- mirror: that stream as torch modules, weights read and written back by name
- moe: the MoE block's mirror (router, hard selection, experts)
- skim: a token-skim point's mirror (predictor, the graph's keep rule, straight-through)
- runtime: the ORT side (frozen prefix: embeddings and masks; teacher; compiled session)
- data: streamed, lazily tokenized, dynamically padded training batches
- distill: recover(), the training loop, early stopping, write-back and the report
- ddp: the same training under torch DistributedDataParallel (gloo, torchrun)
"""
