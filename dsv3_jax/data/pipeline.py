"""The data pipeline: documents -> FIM + tokenise (grain map) -> pack -> shuffled batches (grain).

Validation holds out whole documents (the last `val_fraction` of a seeded document shuffle).
The training iterator is a grain `DatasetIterator`; its `get_state()` is a small JSON-able dict
saved with every checkpoint, so `--resume` continues on exactly the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from dsv3_jax.config import Config
from dsv3_jax.data.corpus import load_documents
from dsv3_jax.data.fim import encode_document
from dsv3_jax.data.packing import pack
from dsv3_jax.data.tokenizer import EOS, load_tokenizer, train_tokenizer
from dsv3_jax.errors import UsageError


@dataclass
class Data:
    tokenizer: Tokenizer
    train_windows: np.ndarray  # [n, seq_len + 1] int32
    val_windows: np.ndarray


def get_tokenizer(config: Config, docs: list[str], run_dir: Path | None) -> Tokenizer:
    """A given tokenizer.json, else the run's cached one (`run_dir`, when resuming), else a new BPE
    trained on the corpus. Reads only: the training loop writes the run's copy once every check passed."""
    cached = run_dir / "tokenizer.json" if run_dir is not None else None
    if config.data.tokenizer:
        tokenizer = load_tokenizer(config.data.tokenizer)
    elif cached is not None and cached.exists():
        tokenizer = load_tokenizer(cached)
    else:
        tokenizer = train_tokenizer(docs, config.model.vocab_size)
    if tokenizer.get_vocab_size() > config.model.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size="
                         f"{config.model.vocab_size}; pass --set model.vocab_size={tokenizer.get_vocab_size()}")
    return tokenizer


def _tokenise(docs: list[str], tokenizer: Tokenizer, fim_rate: float, seed: int) -> list[list[int]]:
    import grain  # imported here: the GPU machine has no grain, and nothing else needs it

    dataset = grain.MapDataset.source(docs).random_map(
        lambda text, rng: encode_document(text, tokenizer, rng, fim_rate), seed=seed)
    return list(dataset)


def build_data(config: Config, run_dir: Path | None = None) -> Data:
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
    eos = tokenizer.token_to_id(EOS)
    seed = config.data.shuffle_seed
    train = pack(_tokenise(train_docs, tokenizer, config.data.fim_rate, seed), window, eos)
    val = pack(_tokenise(val_docs, tokenizer, 0.0, seed + 1), window, eos)
    return Data(tokenizer, train, val)


def train_iterator(windows: np.ndarray, batch_size: int, seed: int):
    """Endless shuffled batches [batch_size, seq_len + 1] with checkpointable state."""
    import grain

    dataset = (grain.MapDataset.source(windows).shuffle(seed=seed).repeat(None)
               .batch(batch_size, drop_remainder=True))
    return iter(dataset.to_iter_dataset())


def val_batches(windows: np.ndarray, batch_size: int, n_batches: int) -> list[np.ndarray]:
    """A fixed validation set: the first n_batches * batch_size held-out windows (cycled if short)."""
    need = n_batches * batch_size
    idx = np.arange(need) % len(windows)
    return [windows[idx[i * batch_size:(i + 1) * batch_size]] for i in range(n_batches)]
