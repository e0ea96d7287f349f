"""Accelerators to compile for without having them: TPU slices and GPU hosts, named as users name them.

    tpu-v5p:2x2x1   a TPU v5p slice of topology 2x2x1 (4 chips); also v4, v5e, v6e
    h100x8          8 H100 SXM GPUs on one host;  h100x16/2: 16 GPUs on 2 hosts (8 each)
                    also h800 (the report's: an H100 with the same SM), h200, a100, b200
    cpu             this host's CPU devices (--host-devices N splits it), for comparison

XLA compiles for hardware that is not attached: libtpu describes a TPU slice from its topology
name (`jax[tpu]`), and the CUDA plugin (`jax[cuda12]`) builds compile-only GPUs from a
`GpuTargetConfig` text proto. The proto is written here from each GPU's published figures (what the
compiler needs: SM count, shared memory per block and per SM, registers, clock, memory, L2, compute
capability); the devices it gives report `platform == "gpu"` and the GPU's name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from dsv3_jax.errors import UsageError, first_line

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class TpuChip:
    name: str  # libtpu's name in topology strings
    hbm_bytes: int  # per chip
    dims: int  # topology dimensions (v4 / v5p: 3-D torus; v5e / v6e: 2-D)


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str  # the device name the GPU reports
    sms: int
    compute_capability: tuple[int, int]
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    l2_bytes: int
    clock_ghz: float
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int  # the most one block may ask for: Pallas / Triton kernels' budget


TPUS = {
    "v4": TpuChip("v4", 32 * GiB, 3),
    "v5e": TpuChip("v5e", 16 * GiB, 2),
    "v5p": TpuChip("v5p", 95 * GiB, 3),
    "v6e": TpuChip("v6e", 32 * GiB, 2),
}
_HOPPER = dict(sms=132, compute_capability=(9, 0), l2_bytes=50 * 1024 ** 2, clock_ghz=1.98,
               shared_memory_per_sm=228 * 1024, shared_memory_per_block_optin=227 * 1024)
GPUS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", memory_bytes=80 * GiB, memory_bandwidth=3.35e12, **_HOPPER),
    "h800": Gpu("NVIDIA H800", memory_bytes=80 * GiB, memory_bandwidth=3.35e12, **_HOPPER),
    "h200": Gpu("NVIDIA H200", memory_bytes=141 * 10 ** 9, memory_bandwidth=4.8e12, **_HOPPER),
    "a100": Gpu("NVIDIA A100-SXM4-80GB", sms=108, compute_capability=(8, 0), memory_bytes=80 * GiB,
                memory_bandwidth=2.04e12, l2_bytes=40 * 1024 ** 2, clock_ghz=1.41,
                shared_memory_per_sm=164 * 1024, shared_memory_per_block_optin=163 * 1024),
    "b200": Gpu("NVIDIA B200", sms=148, compute_capability=(10, 0), memory_bytes=180 * GiB,
                memory_bandwidth=7.7e12, l2_bytes=126 * 1024 ** 2, clock_ghz=1.965,
                shared_memory_per_sm=228 * 1024, shared_memory_per_block_optin=227 * 1024),
}
TARGET_FORMS = ("tpu-{" + ",".join(TPUS) + "}:AxBxC (e.g. tpu-v5p:2x2x1), {" + ",".join(GPUS)
                + "}xN[/HOSTS] (e.g. h100x8) or cpu")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given
    platform: str  # "tpu" | "gpu" | "cpu"
    kind: str  # "v5p", "h100", ...
    topology: tuple[int, ...]  # TPU chips per dimension; GPU (hosts, per host)
    extra: str  # the pyproject extra that brings its compiler

    @property
    def chips(self) -> int:
        return math.prod(self.topology)

    def devices(self) -> list:
        """Compile-only devices of the target (UsageError naming the extra when it is not installed)."""
        import jax
        from jax.experimental import topologies

        if self.platform == "cpu":
            return jax.devices("cpu")
        try:
            if self.platform == "tpu":
                _quiet_compile_only_libtpu()
                shape = "x".join(map(str, self.topology))
                return list(topologies.get_topology_desc(topology_name=f"{self.kind}:{shape}", platform="tpu").devices)
            os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver to check on a CPU host
            hosts, per_host = self.topology
            return list(topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(GPUS[self.kind]),
                                                     topology=f"1x{hosts}x{per_host}").devices)
        except Exception as e:  # a missing plugin surfaces as assorted errors; say what to install
            raise UsageError(f"cannot build {self.name} devices ({first_line(e, 200)}); the {self.platform.upper()} compiler "
                             f"comes with the `{self.extra}` extra: uv run --extra {self.extra} dsv3 compile ...") from None

    def memory_per_device(self, n_devices: int) -> int:
        """HBM per device: a TPU chip's memory is split over its devices (v4: 2 TensorCores, 2 devices)."""
        if self.platform == "tpu":
            return TPUS[self.kind].hbm_bytes * self.chips // n_devices
        if self.platform == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // n_devices
        return GPUS[self.kind].memory_bytes


def _quiet_compile_only_libtpu() -> None:
    """In a process that runs on the host CPU only (JAX_PLATFORMS=cpu: `dsv3 compile`, the tests),
    libtpu just compiles: let several such processes load it (its lockfile guards real chips) and
    skip the TPU VM metadata queries that fail, loudly, off a TPU VM."""
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        return  # a real TPU host: leave libtpu's own setup alone
    for name, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                        ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0")):
        os.environ.setdefault(name, value)


def parse_target(text: str) -> Target:
    """"tpu-v5p:2x2x1" / "h100x8" / "h100x16/2" / "cpu" -> Target; UsageError naming the allowed forms."""
    if text == "cpu":
        return Target(text, "cpu", "cpu", (), "")
    tpu = re.fullmatch(r"tpu-(\w+):(\d+(?:x\d+)*)", text)
    if tpu and tpu.group(1) in TPUS:
        topology = tuple(int(n) for n in tpu.group(2).split("x"))
        if len(topology) != TPUS[tpu.group(1)].dims or min(topology) < 1:
            raise UsageError(f"--target {text!r}: a TPU {tpu.group(1)} topology has {TPUS[tpu.group(1)].dims} "
                             "dimensions, e.g. " + ("2x2x1" if TPUS[tpu.group(1)].dims == 3 else "2x2"))
        return Target(text, "tpu", tpu.group(1), topology, "tpu")
    gpu = re.fullmatch(r"(\w+?)x(\d+)(?:/(\d+))?", text)
    if gpu and gpu.group(1) in GPUS:
        count, hosts = int(gpu.group(2)), int(gpu.group(3) or 1)
        if count < 1 or hosts < 1 or count % hosts:
            raise UsageError(f"--target {text!r}: {count} GPUs must split evenly over {hosts} host(s)")
        return Target(text, "gpu", gpu.group(1), (hosts, count // hosts), "cuda12")
    raise UsageError(f"unknown --target {text!r}: use {TARGET_FORMS}")


def gpu_target_config(gpu: Gpu) -> str:
    """The `GpuTargetConfig` text proto XLA's GPU compiler reads for a GPU that is not attached."""
    major, minor = gpu.compute_capability
    fields = {
        "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 * 1024,
        "shared_memory_per_core": gpu.shared_memory_per_sm, "threads_per_core_limit": 2048,
        "core_count": gpu.sms, "fpus_per_core": 128, "block_dim_limit_x": 2 ** 31 - 1,
        "block_dim_limit_y": 65535, "block_dim_limit_z": 65535, "memory_bandwidth": int(gpu.memory_bandwidth),
        "l2_cache_size": gpu.l2_bytes, "clock_rate_ghz": gpu.clock_ghz, "device_memory_size": gpu.memory_bytes,
        "shared_memory_per_block_optin": gpu.shared_memory_per_block_optin,
        "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
    }
    body = "\n".join(f"  {k}: {v}" for k, v in fields.items())
    return (f"gpu_device_info {{\n{body}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 8 }}\ndevice_description_str: "{gpu.name}"\n')
