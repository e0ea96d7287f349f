"""Pallas kernels for FP8 block-scaled training (report §3.3), each beside its pure-jnp reference.

Every kernel takes `platform`, the platform of the program it is built into (the caller knows it:
`dsv3_jax/platform.py`), and has two variants:
- "tpu" (Mosaic): a grid with K last and sequential ("arbitrary"), an fp32 VMEM accumulator, every
  block's last two dims divisible by (8, 128) or equal to the array's, per-block scalars in SMEM;
- "gpu" (Triton): one program per output tile looping over K in 128-wide steps (Triton loads each
  tile from global memory as it needs it, so K is never resident at once).
platform="cpu" runs the TPU variant in interpret mode; `interpret=True` runs either variant on CPU
(how the tests check both at machine precision). Layout conventions: activations [M, K] are scaled
per 1x128 tile (one fp32 scale per row per 128 of K), weights [K, N] per 128x128 block; scales are
amax / 448 (e4m3's largest normal), optionally rounded up to a power of two.
"""

BLOCK = 128
E4M3_MAX = 448.0
PLATFORMS = ("cpu", "tpu", "gpu")


def variant(platform: str, interpret: bool | None) -> tuple[str, bool]:
    """(kernel variant "tpu" | "gpu", interpret?) for a program built for `platform`."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r} must be one of {PLATFORMS}")
    return ("gpu" if platform == "gpu" else "tpu"), (platform == "cpu" if interpret is None else interpret)


def compiler_params(kernel_variant: str, *semantics: str):
    """Mosaic's grid semantics for TPU; Triton's warps / pipeline stages for GPU (Hopper: 4 warps,
    3 stages of 128-wide K tiles in flight)."""
    if kernel_variant == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=3)
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics)
