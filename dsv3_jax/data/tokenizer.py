"""Byte-level BPE tokenizer (HF `tokenizers`), trained on the corpus or loaded from a file.

Byte-level BPE covers every byte sequence, so decode(encode(text)) == text: FIM pieces can be
tokenised separately and reassembled exactly. DeepSeek-V3 uses a 128K byte-level BPE (§4.1);
a DeepSeek `tokenizer.json` given by path also works.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3_jax.errors import UsageError

EOS = "<|endoftext|>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"
SPECIAL_TOKENS = (EOS, FIM_BEGIN, FIM_HOLE, FIM_END)


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"tokenizer file {str(path)!r} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UsageError(f"tokenizer file {str(path)!r} is not a HF tokenizers JSON file ({e})") from None
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        # A foreign tokenizer (e.g. DeepSeek's) has its own specials; add ours at the end.
        tokenizer.add_special_tokens(missing)
    return tokenizer
