"""Packed weight-only (W4A16 and friends) layouts, a torch oracle, and execution backends.

Kept cheap and side-effect free on purpose: importing `kernels` must not import triton (only
`kernels.triton_w4a16` does, lazily) and must not define `__version__`, because transformers probes a
PyPI package of the same name (`is_kernels_available`) and would mistake this one for it.
`kernels` never imports `harness`.
"""
