"""Document packing: documents (each ending in EOS) are concatenated into one stream and cut
into windows of `window` = seq_len + 1 tokens (inputs and shifted targets). No token is lost or
duplicated: the last partial window is padded with EOS. As in the report (§4.1: document
packing without cross-sample attention masking), documents in a window see each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack(docs_ids: Sequence[Sequence[int | np.integer] | np.ndarray], window: int, pad_id: int) -> np.ndarray:
    """[n_windows, window] int32; row-major order equals the concatenated stream (+ padding)."""
    stream = np.fromiter((t for doc in docs_ids for t in doc), dtype=np.int32)
    n_windows = max(1, -(-len(stream) // window))
    out = np.full(n_windows * window, pad_id, np.int32)
    out[:len(stream)] = stream
    return out.reshape(n_windows, window)


# Packed examples (post-training) ----------------------------------------------------------------
# Each window is four int32 rows, so batches stay one array [B, 4, S] that the grain iterator,
# the batch sharding and the checkpointed data position handle as they do pretraining windows.
PACKED_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")


def pack_examples(examples: list[tuple[list[int], list[int]]], window: int, pad_id: int
                  ) -> tuple[np.ndarray, dict[str, int]]:
    """(token ids, loss mask) pairs -> [n_windows, 4, window] int32 rows PACKED_FIELDS, first-fit.

    Unlike pretraining packing, every example keeps its own segment id (1, 2, ... per window; 0 is
    padding) and positions restarting at 0, so attention and targets never cross examples; the
    loss mask (1 on tokens the loss predicts, e.g. responses) travels with the tokens. An example
    longer than the window is cut to it; one left with no target token is dropped. The counts of
    examples packed, truncated and dropped come back with the windows.
    """
    rows: list[np.ndarray] = []
    free: list[int] = []  # room left in each window
    counts = {"examples": 0, "truncated": 0, "dropped": 0}
    for full_ids, full_mask in examples:
        ids, mask = list(full_ids)[:window], list(full_mask)[:window]
        if not any(mask[1:]):  # the first token of an example is never a target
            counts["dropped"] += 1
            continue
        counts["truncated"] += len(full_ids) > window
        n = len(ids)
        slot = next((i for i in range(max(0, len(free) - 64), len(free)) if free[i] >= n), None)
        if slot is None:
            rows.append(np.zeros((4, window), np.int32))
            rows[-1][0] = pad_id
            free.append(window)
            slot = len(rows) - 1
        row, start = rows[slot], window - free[slot]
        row[0, start:start + n] = ids
        row[1, start:start + n] = np.arange(n)
        row[2, start:start + n] = row[2].max() + 1
        row[3, start:start + n] = mask
        free[slot] -= n
        counts["examples"] += 1
    if not rows:
        raise ValueError(f"no example has a target token within the window of {window} tokens")
    return np.stack(rows), counts


def unpack(batch):
    """(tokens_BS, positions_BS, segment_ids_BS, loss_mask_BS) of a packed batch [B, 4, S]; a plain
    pretraining batch [B, S] gives (tokens_BS, None, None, None). Works on numpy and jax arrays."""
    if batch.ndim == 2:
        return batch, None, None, None
    return tuple(batch[:, i] for i in range(len(PACKED_FIELDS)))
