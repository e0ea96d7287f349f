"""An exponential moving average of the parameters, kept in host memory (report §3.2.3).

The report keeps the EMA "in CPU memory ... updated asynchronously after each training step", for an
early estimate of the model after learning-rate decay, at no device memory. Here every
`train.ema_every` steps, once the step has finished (the loop has read its metrics):

1. the parameters are copied to host memory: `jax.device_put` to the same shardings with memory
   kind `pinned_host` (a DMA the next step does not wait for; each device's shards only), or, on a
   backend without a host memory kind, a host numpy copy of each shard;
2. a worker thread folds the copy into the EMA, one numpy array per distinct shard this process
   holds, in place: ema <- decay * ema + (1 - decay) * params. numpy releases the GIL for these
   arrays, so the loop dispatches the next step meanwhile. At most one update is in flight (a
   second waits for the first), so host memory holds the EMA and one copy.

`decay` applies per update: with updates every N steps the EMA's time constant is N / (1 - decay)
steps. The EMA starts at the initial parameters, is saved with each checkpoint (an orbax item
"ema", host arrays of the parameters' shardings, so it restores onto any mesh) and resumes exactly.
At evaluations the loop also evaluates the EMA's parameters (val_loss_ema), placed on the devices
for that evaluation only.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

HOST_KIND = "pinned_host"


def host_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """`sharding` in host memory where its devices have a host memory kind, else itself."""
    device = next(iter(sharding.device_set))
    kinds = {memory.kind for memory in device.addressable_memories()}
    return sharding.with_memory_kind(HOST_KIND) if HOST_KIND in kinds else sharding


def _shard_key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _local_shards(array: jax.Array) -> dict[tuple, jax.Array]:
    """This process's distinct shards of `array` (replicas on its devices read once)."""
    shards: dict[tuple, jax.Array] = {}
    for shard in array.addressable_shards:
        shards.setdefault(_shard_key(shard.index), shard.data)
    return shards


class HostEMA:
    """EMA of a parameter tree (an nnx.State of jax.Arrays) in host memory; see the module doc."""

    def __init__(self, decay: float, every: int, params: Any):
        assert 0.0 < decay < 1.0 and every >= 1, (decay, every)
        self.decay, self.every = decay, every
        leaves, self.treedef = jax.tree.flatten(params)
        self.shapes = [(leaf.shape, leaf.dtype) for leaf in leaves]
        self.device_shardings = [leaf.sharding for leaf in leaves]
        self.host_shardings = [host_sharding(s) for s in self.device_shardings]
        # [leaf] -> {shard index: float32 numpy array}: what this process holds of the EMA
        self.shards = [{k: np.array(v, np.float32) for k, v in self._read(self._host_copy(leaf, i)).items()}
                       for i, leaf in enumerate(leaves)]
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsv3-ema")
        self._pending: Future | None = None

    def _host_copy(self, leaf: jax.Array, i: int):
        """The leaf's shards in host memory: an asynchronous copy (host memory kind) or numpy."""
        if self.host_shardings[i] is not self.device_shardings[i]:
            return _local_shards(jax.device_put(leaf, self.host_shardings[i], may_alias=False))
        return {k: np.array(v) for k, v in _local_shards(leaf).items()}

    @staticmethod
    def _read(shards: dict) -> dict[tuple, np.ndarray]:
        return {k: np.asarray(v) for k, v in shards.items()}

    def update(self, step: int, params: Any) -> None:
        """Fold `params` (the state after optimizer step `step`) in, if `step` is an update step."""
        if step % self.every:
            return
        self.wait()
        copies = [self._host_copy(leaf, i) for i, leaf in enumerate(jax.tree.leaves(params))]
        self._pending = self._worker.submit(self._fold, copies)

    def _fold(self, copies: list[dict]) -> None:
        keep = np.float32(self.decay)
        for ema, copy in zip(self.shards, copies):
            for key, value in self._read(copy).items():
                ema[key] *= keep
                ema[key] += (np.float32(1) - keep) * value  # numpy: the GIL is released for the arithmetic

    def wait(self) -> None:
        """Until the update in flight (if any) is folded in; re-raises its error."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def _arrays(self, shardings: list) -> Any:
        self.wait()
        leaves = [jax.make_array_from_callback(shape, sharding, lambda index, s=shards: s[_shard_key(index)]
                                               .astype(dtype))
                  for (shape, dtype), sharding, shards in zip(self.shapes, shardings, self.shards)]
        return jax.tree.unflatten(self.treedef, leaves)

    def host_arrays(self) -> Any:
        """The EMA as a tree of global jax.Arrays in host memory (what a checkpoint saves)."""
        return self._arrays(self.host_shardings)

    def device_params(self) -> Any:
        """The EMA as parameters on the devices, sharded as the live ones (for an evaluation)."""
        return self._arrays(self.device_shardings)

    def restore_target(self) -> Any:
        """Shapes and host shardings for restoring a checkpoint's "ema" item."""
        leaves = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
                  for (shape, dtype), sharding in zip(self.shapes, self.host_shardings)]
        return jax.tree.unflatten(self.treedef, leaves)

    def load(self, saved: Any) -> None:
        """Replace the EMA by a restored one (host arrays with this EMA's shapes and shardings)."""
        self.wait()
        self.shards = [{k: np.array(v, np.float32) for k, v in self._read(_local_shards(leaf)).items()}
                       for leaf in jax.tree.leaves(saved)]

    def close(self) -> None:
        self.wait()
        self._worker.shutdown()
