"""Graph rewrites, one per module, each a frozen config and a plain `apply_<effect>`.

Each module exports `<Effect>Config` and `apply_<effect>(model, spec, config) -> int`
(how many blocks changed). The compile runs them as stages (compiler/driver/stages.py,
listed in compiler/driver/pipeline.STAGES); fitting code sits beside them (prune_fit,
importance, moe_fit, skim_fit).
"""
