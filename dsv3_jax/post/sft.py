"""Supervised fine-tuning (report §5.1): (prompt, response) examples, loss on the responses only.

An SFT run is a training run with `train.objective="sft"`: the same loop (jobs/train.py), run
directory, resume, checkpoints and plots as pretraining. What is particular to it lives here:
reading the examples file, the chat template, tokenising each example with its loss mask, packing
them so no example attends to another (data/packing.py), and starting from a base run's weights.
As in the report, the learning rate decays with a cosine from its peak (5e-6 -> 1e-6 there; the
tiny presets use proportionally larger values, see `sft_config`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Protocol

import numpy as np

from dsv3_jax.checkpoint import Checkpointer, load_trained
from dsv3_jax.config import Config, apply_overrides, config_from_json
from dsv3_jax.data.packing import pack_examples
from dsv3_jax.data.pipeline import Data
from dsv3_jax.data.tokenizer import EOS, load_tokenizer
from dsv3_jax.errors import UsageError
from dsv3_jax.model.routing import RoutingBias

EXAMPLE_FORMAT = ('{"prompt": "...", "response": "..."} or {"messages": [{"role": "system|user|assistant", '
                  '"content": "..."}, ...]}')
# The chat template: plain-text role headers (the byte-level BPE has no chat special tokens); each
# assistant turn ends with EOS, which is a target so the model learns where to stop.
ROLE_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
TURN_SEPARATOR = "\n\n"

Pieces = list[tuple[str, bool]]  # (text, whether the loss predicts it)


def chat_prompt(messages: list[dict]) -> str:
    """The text a model sees before its answer: the conversation so far and the assistant header."""
    return "".join(ROLE_HEADERS[m["role"]] + m["content"] + TURN_SEPARATOR for m in messages) \
        + ROLE_HEADERS["assistant"]


def example_pieces(record, where: str) -> Pieces:
    """One jsonl record as pieces; anything else is refused with the line it came from."""
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        if not record["response"]:
            raise UsageError(f"{where}: \"response\" is empty; every example needs something to learn")
        return [(record["prompt"], False), (record["response"], True)]
    messages = record.get("messages") if isinstance(record, dict) else None
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in ROLE_HEADERS and isinstance(m.get("content"), str)
            for m in messages)):
        raise UsageError(f"{where}: expected {EXAMPLE_FORMAT}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UsageError(f"{where}: the messages have no assistant turn to learn")
    pieces: Pieces = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            pieces += [(ROLE_HEADERS["assistant"], False), (m["content"], True)]
        else:
            pieces.append((ROLE_HEADERS[m["role"]] + m["content"], False))
        if i + 1 < len(messages):
            pieces.append((TURN_SEPARATOR, False))
    return pieces


def read_examples(path: str | Path) -> list[Pieces]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"SFT data {str(path)!r} is not a file; give a .jsonl file with one example per line: "
                         f"{EXAMPLE_FORMAT}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"SFT data {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{number}: not JSON ({e.msg}); expected {EXAMPLE_FORMAT}") from None
        examples.append(example_pieces(record, f"{path}:{number}"))
    if len(examples) < 2:
        raise UsageError(f"SFT data {str(path)!r} has {len(examples)} example(s); need at least 2 (some are held out "
                         "for the eval loss)")
    return examples


@typing.runtime_checkable
class TextEncoder(Protocol):
    """What `encode_example` needs of a tokenizer (a `tokenizers.Tokenizer` is one)."""

    def encode(self, text: str, add_special_tokens: bool = ...): ...


def encode_example(pieces: Pieces, tokenizer: TextEncoder, eos_id: int) -> tuple[list[int], list[int]]:
    """Token ids and loss mask; each piece is tokenised on its own (as generation sees a prompt
    and then produces the response) and every target piece is followed by EOS, also a target."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_target in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False).ids + ([eos_id] if is_target else [])
        ids += piece
        mask += [int(is_target)] * len(piece)
    return ids, mask


def build_sft_data(config: Config, run_dir: Path | None = None) -> Data:
    """Packed train / held-out windows [n, 4, seq_len + 1]; the held-out examples are the last
    `data.val_fraction` of a seeded shuffle. The tokenizer is the base run's (its copy in `run_dir`
    once the run has one, so a moved base does not stop a resume)."""
    own = run_dir / "tokenizer.json" if run_dir is not None else None
    tokenizer = load_tokenizer(own if own is not None and own.is_file() else config.data.tokenizer)
    examples = read_examples(config.data.source)
    eos = tokenizer.token_to_id(EOS)
    encoded = [encode_example(pieces, tokenizer, eos) for pieces in examples]
    order = np.random.default_rng(config.data.shuffle_seed).permutation(len(encoded))
    n_val = max(1, int(round(len(encoded) * config.data.val_fraction)))
    window = config.train.seq_len + 1
    try:
        train, _ = pack_examples([encoded[i] for i in order[n_val:]], window, eos)
        val, _ = pack_examples([encoded[i] for i in order[:n_val]], window, eos)
    except ValueError as e:
        raise UsageError(f"SFT data {config.data.source!r}: {e}; raise train.seq_len (<= model.max_seq_len="
                         f"{config.model.max_seq_len}) or shorten the prompts") from None
    return Data(tokenizer, {0: train}, val)


def sft_config(base_dir: str | Path, data: str | Path, overrides: list[str]) -> Config:
    """The config of a new SFT run from the base run's: same model and tokenizer, the examples file
    as data, and SFT defaults (a third of the base peak lr, warmup then cosine decay to 0.2x, no FIM,
    5% held out), then `overrides`. Refuses a base without config or checkpoint before anything."""

    base_dir = Path(base_dir).absolute()
    if not (base_dir / "config.json").is_file():
        raise UsageError(f"--from {str(base_dir)!r} is not a dsv3 run directory (no config.json)")
    checkpointer = Checkpointer(base_dir / "checkpoints", read_only=True) if (base_dir / "checkpoints").is_dir() else None
    latest = checkpointer.latest_step() if checkpointer is not None else None
    if checkpointer is not None:
        checkpointer.close()
    if latest is None:
        raise UsageError(f"--from {str(base_dir)!r} has no checkpoint to start from (train it first)")
    base = config_from_json((base_dir / "config.json").read_text())
    tokenizer = base.data.tokenizer or str(base_dir / "tokenizer.json")
    train = dataclasses.replace(base.train, objective="sft", init_from=str(base_dir), steps=200, lr=base.train.lr / 3,
                                warmup_steps=10, decay_start_fraction=0.0, min_lr_ratio=0.2, eval_every=50,
                                checkpoint_every=100)
    data_config = dataclasses.replace(base.data, source=str(Path(data).absolute()), tokenizer=tokenizer, fim_rate=0.0,
                                      val_fraction=0.05)
    return apply_overrides(Config(model=base.model, train=train, data=data_config), overrides)


def init_from_run(state, config: Config, mesh=None):
    """`state` with the weights and routing bias of the latest checkpoint of `train.init_from`, read
    onto `mesh` (the run's; None: one device) whatever mesh the base run was trained on (the
    optimizer's moments are zeros either way, so they stay as initialised)."""
    from flax import nnx

    base_dir = Path(config.train.init_from)
    base_config = config_from_json((base_dir / "config.json").read_text()) \
        if (base_dir / "config.json").is_file() else None
    if base_config is None or base_config.model != config.model:
        raise UsageError(f"train.init_from={str(base_dir)!r} is not a run of this model (model.* must equal the "
                         "base run's config.json)")
    _, model, _ = load_trained(base_dir, with_tokenizer=False, mesh=mesh)
    _, params, routing_bias = nnx.split(model, nnx.Param, RoutingBias)
    return state.replace(params=params, routing_bias=routing_bias)
