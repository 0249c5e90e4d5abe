"""The driver floor of `compiler/`: the pipeline and the CLI, which import passes/ and cost_model/.

Modules below this package (the core: loading, canonicalize, blocks, spec, plan,
calibration, emit, irutil) never import from here, from `planer.passes` or from
`planer.cost_model`.
"""
