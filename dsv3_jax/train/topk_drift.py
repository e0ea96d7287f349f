"""How much the routing still moves: the fraction of validation tokens whose experts changed since
the last evaluation, per MoE layer (router.jsonl `topk_changed`, metrics.jsonl `val_topk_changed`).

Each evaluation's eval step returns, per layer, a 32-bit signature of every validation token's set
of experts (model/routing.py `choice_signature`); a token "changed" when its signature differs from
the previous evaluation's (same validation tokens, same order). The previous evaluation's
signatures are kept in the run directory (routing_signatures/STEP.npy) so a resumed run compares
with the same evaluation an uninterrupted one would: a resume drops the files of the steps it
redoes, and pruning keeps every file a resume from a kept checkpoint can need.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class TopKDrift:
    def __init__(self, directory: Path, main: bool):
        self.directory, self.main = Path(directory), main  # only process 0 writes (and reports) it
        self.previous_LN: np.ndarray | None = None

    def _files(self) -> dict[int, Path]:
        if not self.directory.is_dir():
            return {}
        return {int(p.stem): p for p in self.directory.glob("*.npy") if p.stem.isdigit()}

    def start(self, resumed_at: int) -> None:
        """From step `resumed_at` (0: a new run, which forgets every earlier file)."""
        if not self.main:
            return
        files = self._files()
        for step, path in files.items():
            if step > resumed_at:  # evaluations the resumed run redoes (a new run: all of them)
                path.unlink()
        kept = [step for step in files if step <= resumed_at]
        self.previous_LN = np.load(files[max(kept)]) if kept else None

    def update(self, step: int, signature_LN: np.ndarray, oldest_checkpoint: int | None) -> list[float] | None:
        """Per layer, the fraction of tokens whose expert set changed since the previous evaluation
        (None at the first one); records this evaluation's signatures."""
        if not self.main:
            return None
        signature_LN = np.asarray(signature_LN, np.uint32)
        previous, self.previous_LN = self.previous_LN, signature_LN
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{step}.npy"
        np.save(partial, signature_LN)
        os.replace(partial, self.directory / f"{step}.npy")
        self._prune(oldest_checkpoint)
        if previous is None or previous.shape != signature_LN.shape:
            return None
        return (previous != signature_LN).mean(-1).tolist()

    def _prune(self, oldest_checkpoint: int | None) -> None:
        """Drop files no resume can need: older than the newest one at or before the oldest checkpoint."""
        if oldest_checkpoint is None:
            return
        files = self._files()
        needed = max((step for step in files if step <= oldest_checkpoint), default=None)
        for step, path in files.items():
            if needed is not None and step < needed:
                path.unlink()
