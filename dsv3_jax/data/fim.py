"""Fill-in-the-Middle in PSM form (report §4.1, following DeepSeekCoder-V2):

    <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle <|endoftext|>

applied to a document with probability `fim_rate` (0.1). The split points are uniform over
characters, so the model still learns plain next-token prediction on the middle.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from dsv3_jax.data.tokenizer import EOS, FIM_BEGIN, FIM_END, FIM_HOLE


def fim_split(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Cut `text` at two random character positions into (prefix, middle, suffix)."""
    lo, hi = sorted(int(i) for i in rng.integers(0, len(text) + 1, size=2))
    return text[:lo], text[lo:hi], text[hi:]


def encode_document(text: str, tokenizer: Tokenizer, rng: np.random.Generator, fim_rate: float) -> list[int]:
    """Token ids of one document, FIM-transformed with probability fim_rate, ending in EOS."""
    eos = tokenizer.token_to_id(EOS)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids
    if rng.random() >= fim_rate:
        return enc(text) + [eos]
    prefix, middle, suffix = fim_split(text, rng)
    begin, hole, end = (tokenizer.token_to_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END))
    return [begin] + enc(prefix) + [hole] + enc(suffix) + [end] + enc(middle) + [eos]


def reassemble(ids: list[int], tokenizer: Tokenizer) -> str:
    """Inverse of encode_document: the original text of a (FIM or plain) document."""
    begin, hole, end, eos = (tokenizer.token_to_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END, EOS))
    assert ids and ids[-1] == eos, "a document ends with EOS"
    ids = ids[:-1]
    dec = lambda xs: tokenizer.decode(xs, skip_special_tokens=False)
    if not ids or ids[0] != begin:
        return dec(ids)
    i_hole, i_end = ids.index(hole), ids.index(end)
    prefix, suffix, middle = ids[1:i_hole], ids[i_hole + 1:i_end], ids[i_end + 1:]
    return dec(prefix) + dec(middle) + dec(suffix)
