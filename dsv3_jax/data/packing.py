"""Document packing: documents (each ending in EOS) are concatenated into one stream and cut
into windows of `window` = seq_len + 1 tokens (inputs and shifted targets). No token is lost or
duplicated: the last partial window is padded with EOS. As in the report (§4.1: document
packing without cross-sample attention masking), documents in a window see each other.
"""

from __future__ import annotations

import numpy as np


def pack(docs_ids: list[list[int]], window: int, pad_id: int) -> np.ndarray:
    """[n_windows, window] int32; row-major order equals the concatenated stream (+ padding)."""
    stream = np.fromiter((t for doc in docs_ids for t in doc), dtype=np.int32)
    n_windows = max(1, -(-len(stream) // window))
    out = np.full(n_windows * window, pad_id, np.int32)
    out[:len(stream)] = stream
    return out.reshape(n_windows, window)
