"""File formats' pure-torch codecs that both the registry (files) and the kernels (slot pools) need.

A layer of its own below both: `registry` and `deltakernels` import it, it imports neither (nor triton).
"""
