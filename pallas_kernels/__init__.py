"""Pallas kernels for FP8 block-scaled training (report §3.3), each beside its pure-jnp reference.

On CPU they run with `interpret=True`; for TPU they lower through Mosaic, for GPU through Mosaic GPU
(jax's default Pallas GPU backend), when they satisfy its block rules (`dsv3 compile --kernels` says). Layout conventions:
activations [M, K] are scaled per 1x128 tile (one fp32 scale per row per 128 of K), weights
[K, N] per 128x128 block; scales are amax / 448 (e4m3's largest normal), optionally rounded up
to a power of two.
"""

BLOCK = 128
E4M3_MAX = 448.0
