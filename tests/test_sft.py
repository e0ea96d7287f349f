"""Supervised fine-tuning (post/sft.py, data/packing.py): the loss sees response tokens only, packed
examples never see each other, bad data is refused with the line it came from."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import cli_env
from dsv3_jax.config import Config
from dsv3_jax.data.packing import PACKED_FIELDS, pack_examples, unpack
from dsv3_jax.errors import UsageError
from dsv3_jax.model.model import DeepSeekV3, ModelStats
from dsv3_jax.model.routing import Balancing
from dsv3_jax.post.sft import encode_example, example_pieces, read_examples
from dsv3_jax.train.loss import total_loss

EXAMPLES = [([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), ([10, 11, 12], [0, 1, 1]), ([13, 14, 15, 16, 17, 18, 19], [0, 0, 0, 0, 1, 1, 1]),
            ([20, 21], [0, 1]), ([22, 23, 24], [1, 1, 1])]  # a first token marked as a target is still none


def test_packing_keeps_every_example_whole_and_apart():
    windows, counts = pack_examples(EXAMPLES, window=10, pad_id=1)
    assert windows.shape[1:] == (len(PACKED_FIELDS), 10)
    assert counts == {"examples": 5, "truncated": 0, "dropped": 0}
    found = []
    for tokens, positions, segments, mask in windows:
        for seg in np.unique(segments[segments > 0]):
            where = np.flatnonzero(segments == seg)
            assert np.all(np.diff(where) == 1)  # contiguous
            np.testing.assert_array_equal(positions[where], np.arange(len(where)))  # positions restart
            found.append((tokens[where].tolist(), mask[where].tolist()))
        assert np.all(mask[segments == 0] == 0) and np.all(tokens[segments == 0] == 1)
    assert sorted(found) == sorted((list(i), list(m)) for i, m in EXAMPLES)


def test_packing_cuts_long_examples_and_drops_those_left_without_targets():
    windows, counts = pack_examples([([1] * 12, [0] * 6 + [1] * 6), ([2] * 12, [0] * 11 + [1])], window=8, pad_id=0)
    assert counts == {"examples": 1, "truncated": 1, "dropped": 1}
    assert windows[0, 3].tolist() == [0] * 6 + [1] * 2
    with pytest.raises(ValueError, match="no example"):
        pack_examples([([1, 2], [1, 0])], window=8, pad_id=0)


def _packed_batch(rows):
    windows, _ = pack_examples(rows, window=12, pad_id=1)
    return jnp.asarray(windows)


def test_loss_gradient_reaches_response_logits_only(tiny_cfg):
    """d loss / d logits is zero at every position whose target is a prompt token, padding, or the
    first token of the next packed example; non-zero where the target is a response token."""
    tokens_BS, _, segments_BS, mask_BS = unpack(_packed_batch(EXAMPLES))
    B, S = tokens_BS.shape
    logits_BTV = jax.random.normal(jax.random.key(0), (B, S - 1, tiny_cfg.vocab_size))
    stats = ModelStats(None, None)

    def loss(logits):
        return total_loss(logits, None, stats, tokens_BS, 0.0, Balancing(()), mask_BS, segments_BS).total

    grad_BT = np.abs(np.asarray(jax.grad(loss)(logits_BTV))).sum(-1)
    target_is_response = (np.asarray(mask_BS[:, 1:]) == 1) & (np.asarray(segments_BS[:, 1:]) == np.asarray(segments_BS[:, :-1]))
    assert target_is_response.sum() == sum(sum(m[1:]) for _, m in EXAMPLES)
    assert np.all(grad_BT[~target_is_response] == 0.0)
    assert np.all(grad_BT[target_is_response] > 0.0)
    # and the value: mean CE over exactly those targets
    logp = jax.nn.log_softmax(logits_BTV)
    picked = np.take_along_axis(np.asarray(logp), np.asarray(tokens_BS[:, 1:])[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss(logits_BTV)), -picked[target_is_response].mean(), rtol=1e-6)


def test_a_packed_example_sees_only_itself(tiny_cfg):
    """Logits of each example packed beside others equal its logits run alone (MLA's segment mask,
    positions restarting per example; MTP's block too)."""
    model = DeepSeekV3(tiny_cfg, nnx.Rngs(0))
    packed = _packed_batch(EXAMPLES)
    tokens_BS, positions_BS, segments_BS, _ = unpack(packed)
    out = model(tokens_BS, positions_BS, True, segments_BS)
    segments = np.asarray(segments_BS)
    examples = [(row, np.flatnonzero(segments[row] == seg)) for row in range(segments.shape[0])
                for seg in np.unique(segments[row]) if seg != 0]
    # Each example alone in its own row, from position 0, zero-padded after its end to one length so
    # one forward runs them all (attention is causal: the padding is after every position compared).
    alone_NT = np.zeros((len(examples), max(len(where) for _, where in examples)), np.int32)
    for i, (row, where) in enumerate(examples):
        alone_NT[i, :len(where)] = np.asarray(tokens_BS[row, where])
    alone = model(jnp.asarray(alone_NT))
    for i, (row, where) in enumerate(examples):
        n = len(where)
        np.testing.assert_allclose(out.logits_BTV[row, where], alone.logits_BTV[i, :n], atol=2e-5, rtol=1e-5)
        # MTP depth 1 at the example's positions whose input t_{i+1} is still in the example
        np.testing.assert_allclose(out.mtp_logits_PBTV[0, row, where[:-1]], alone.mtp_logits_PBTV[0, i, :n - 1],
                                   atol=2e-5, rtol=1e-5)


def test_examples_in_both_formats_become_masked_pieces():
    assert example_pieces({"prompt": "2+2=", "response": "4"}, "x") == [("2+2=", False), ("4", True)]
    pieces = example_pieces({"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "2+2?"},
                                          {"role": "assistant", "content": "4"}]}, "x")
    assert [p for p, target in pieces if target] == ["4"]
    assert "".join(p for p, _ in pieces) == "System: Be brief.\n\nUser: 2+2?\n\nAssistant: 4"

    class Chars:  # a tokenizer with one token per character
        def encode(self, text, add_special_tokens=False):
            return type("E", (), {"ids": [ord(c) for c in text]})()

    ids, mask = encode_example([("ab", False), ("c", True)], Chars(), eos_id=0)
    assert ids == [97, 98, 99, 0] and mask == [0, 0, 1, 1]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a"}', "expected"),
    ('{"prompt": "a", "response": ""}', "empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "expected"),
    ("not json", "not JSON"),
])
def test_bad_example_lines_are_named(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1+1=", "response": "2"}\n' + line + "\n")
    with pytest.raises(UsageError, match=message) as error:
        read_examples(path)
    assert f"{path}:2" in str(error.value)


def _dsv3(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dsv3_jax.cli", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout)


def test_sft_cli_runs_resumes_and_refuses_bad_input(tiny_base_run, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n"
                            for a in range(20) for b in range(10)))
    run = tmp_path / "sft"
    done = _dsv3("sft", "--from", str(tiny_base_run), "--data", str(data), "--run-dir", str(run), "--steps", "2",
                 "--set", "train.batch_size=4", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["objective"] == "sft" and saved["train"]["init_from"] == str(tiny_base_run.absolute())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and "val_loss" in records[-1]
    resumed = _dsv3("sft", "--run-dir", str(run), "--resume", "--steps", "3", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": "2"}\n{"question": "x"}\n')
    no_checkpoint = tmp_path / "empty_run"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.json").write_text(Config().to_json())
    for args, message in ((("--from", str(tiny_base_run), "--data", str(bad)), f"{bad}:2"),
                          (("--from", str(no_checkpoint), "--data", str(data)), "no checkpoint"),
                          (("--from", str(tiny_base_run), "--data", str(tmp_path / "missing.jsonl")), "not a file")):
        failed = _dsv3("sft", *args, "--run-dir", str(tmp_path / "never"), timeout=120)
        assert failed.returncode == 2, failed.stderr
        assert message in failed.stderr and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
        assert not (tmp_path / "never").exists()
