"""The data pipeline: documents -> FIM + tokenise (grain map) -> pack -> shuffled batches (grain).

Validation holds out whole documents (the last `val_fraction` of a seeded document shuffle).
The training iterator is a grain `DatasetIterator`; its `get_state()` is a small JSON-able dict
saved with every checkpoint, so `--resume` continues on exactly the next batch.

With `data.shards` = S > 1 the training documents are split into S shards (document i of the
shuffled training set goes to shard i mod S), each tokenised, packed and shuffled on its own, and a
global batch is batch_size / S rows of each shard in shard order. A process tokenises and packs
only the shards whose rows land on its devices (`shards_for_rows`) and yields only those rows
(`ShardedBatches`); the batches are the same whatever the number of processes. Every process still
reads the corpus's text: the split follows a seeded shuffle of all documents, validation holds out
whole documents from all of them, and a tokenizer trained here (not given by `data.tokenizer`)
learns from all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from dsv3_jax.config import Config
from dsv3_jax.data import cache
from dsv3_jax.data.corpus import load_documents
from dsv3_jax.data.fim import encode_document
from dsv3_jax.data.packing import pack
from dsv3_jax.data.tokenizer import EOS, load_tokenizer, train_tokenizer
from dsv3_jax.errors import UsageError


@dataclass
class Data:
    tokenizer: Tokenizer
    train_shards: dict[int, np.ndarray]  # the shards this process reads: shard -> windows [n, seq_len + 1]
    val_windows: np.ndarray

    @property
    def train_windows(self) -> np.ndarray:
        """The training windows of a one-shard pipeline."""
        (windows,) = self.train_shards.values()
        return windows


def get_tokenizer(config: Config, docs: list[str], run_dir: Path | None) -> Tokenizer:
    """A given tokenizer.json, else the run's cached one (`run_dir`, when resuming), else a new BPE
    trained on the corpus. Reads only: the training loop writes the run's copy once every check passed."""
    cached = run_dir / "tokenizer.json" if run_dir is not None else None
    if config.data.tokenizer:
        tokenizer = load_tokenizer(config.data.tokenizer)
    elif cached is not None and cached.exists():
        tokenizer = load_tokenizer(cached)
    else:
        tokenizer = cache.cached("tokenizer", cache.digest("bpe", config.model.vocab_size, docs),
                                 lambda: train_tokenizer(docs, config.model.vocab_size),
                                 lambda tokenizer, path: tokenizer.save(str(path)), load_tokenizer)
    if tokenizer.get_vocab_size() > config.model.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size="
                         f"{config.model.vocab_size}; pass --set model.vocab_size={tokenizer.get_vocab_size()}")
    return tokenizer


def _tokenise(docs: list[str], tokenizer: Tokenizer, fim_rate: float, seed: int) -> list[list[int]]:
    import grain  # imported here: the GPU machine has no grain, and nothing else needs it

    dataset = grain.MapDataset.source(docs).random_map(
        lambda text, rng: encode_document(text, tokenizer, rng, fim_rate), seed=seed)
    # By index, the same documents as iterating it: iteration goes through grain's threaded prefetch
    # and its per-element statistics, 5x the time here (1.25 s -> 0.26 s for the synthetic corpus).
    return [dataset[i] for i in range(len(dataset))]


def _windows(docs: list[str], tokenizer: Tokenizer, fim_rate: float, seed: int, window: int) -> np.ndarray:
    """The documents FIM-transformed, tokenised and packed into windows (read from the data cache when
    they were built before from the same text, tokenizer and settings)."""
    eos = tokenizer.token_to_id(EOS)
    key = cache.digest("windows", tokenizer.to_str(), fim_rate, seed, window, docs)

    def write(windows: np.ndarray, path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, windows)

    return cache.cached("windows", key, lambda: pack(_tokenise(docs, tokenizer, fim_rate, seed), window, eos), write,
                        lambda path: np.load(path))


def build_data(config: Config, run_dir: Path | None = None, shards: list[int] | None = None) -> Data:
    """Tokenizer, the training windows of `shards` (default: all of data.shards) and the validation windows."""
    docs = load_documents(config.data.source, config.data.max_bytes)
    tokenizer = get_tokenizer(config, docs, run_dir)
    order = np.random.default_rng(config.data.shuffle_seed).permutation(len(docs))
    n_val = max(1, int(round(len(docs) * config.data.val_fraction)))
    if len(docs) < 2:
        raise UsageError(f"data source {config.data.source!r} has {len(docs)} document; need at least 2 "
                         "(one is held out for validation)")
    train_docs = [docs[i] for i in order[n_val:]]
    val_docs = [docs[i] for i in order[:n_val]]
    window = config.train.seq_len + 1
    seed = config.data.shuffle_seed
    n_shards = config.data.shards
    train = {shard: _windows(train_docs[shard::n_shards], tokenizer, config.data.fim_rate, seed + shard, window)
             for shard in (range(n_shards) if shards is None else shards)}
    for shard, windows in train.items():
        if len(windows) < config.train.batch_size // n_shards:
            raise UsageError(f"data shard {shard} of {n_shards} has {len(windows)} windows of {window} tokens, "
                             f"fewer than the {config.train.batch_size // n_shards} rows it gives each batch; use "
                             "fewer data.shards or more data")
    val = _windows(val_docs, tokenizer, 0.0, seed + n_shards, window)
    return Data(tokenizer, train, val)


def train_iterator(windows: np.ndarray, batch_size: int, seed: int):
    """Endless shuffled batches [batch_size, seq_len + 1] with checkpointable state."""
    import grain

    dataset = (grain.MapDataset.source(windows).shuffle(seed=seed).repeat(None)
               .batch(batch_size, drop_remainder=True))
    return iter(dataset.to_iter_dataset())


def shards_for_rows(first_row: int, end_row: int, batch_size: int, n_shards: int) -> list[int]:
    """The data shards whose rows of a global batch are rows [first_row, end_row) (a process's rows)."""
    rows = batch_size // n_shards
    if first_row % rows or end_row % rows:
        raise UsageError(f"this process holds rows [{first_row}, {end_row}) of each batch of {batch_size}, which "
                         f"splits data shards of {rows} rows (data.shards={n_shards}); make data.shards a multiple "
                         "of the number of processes")
    return list(range(first_row // rows, end_row // rows))


class ShardedBatches:
    """This process's rows of every global batch: batch_size / data.shards shuffled rows from each
    shard it reads, in shard order. The shards advance together, so any one's grain state (a batch
    index) is all of theirs: the saved state is the same as one shard's, and the same on every process.
    With one shard this is `train_iterator` itself."""

    def __init__(self, train_shards: dict[int, np.ndarray], batch_size: int, n_shards: int, seed: int):
        self._iterators = [train_iterator(windows, batch_size // n_shards, seed + shard)
                           for shard, windows in sorted(train_shards.items())]

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return np.concatenate([next(iterator) for iterator in self._iterators])

    def get_state(self) -> dict:
        return self._iterators[0].get_state()

    def set_state(self, state: dict) -> None:
        for iterator in self._iterators:
            iterator.set_state(state)


def val_batches(windows: np.ndarray, batch_size: int, n_batches: int) -> list[np.ndarray]:
    """A fixed validation set: the first n_batches * batch_size held-out windows (cycled if short)."""
    need = n_batches * batch_size
    idx = np.arange(need) % len(windows)
    return [windows[idx[i * batch_size:(i + 1) * batch_size]] for i in range(n_batches)]
