import json

import numpy as np
import pytest

from dsv3_jax.config import ConfigError, apply_overrides, get_preset
from dsv3_jax.data.corpus import load_documents, stdlib_files
from dsv3_jax.data.fim import encode_document, fim_split, reassemble
from dsv3_jax.data.packing import pack
from dsv3_jax.data.pipeline import ShardedBatches, build_data, shards_for_rows, train_iterator
from dsv3_jax.data.tokenizer import EOS, FIM_BEGIN, train_tokenizer
from dsv3_jax.errors import UsageError


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(load_documents("stdlib", 300_000), vocab_size=600)


def test_stdlib_corpus_is_real_python_in_fixed_order():
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files[:50])
    docs = load_documents("stdlib", 50_000)
    assert docs == load_documents("stdlib", 50_000)
    assert any("def " in d for d in docs)


def test_byte_level_round_trip(tokenizer):
    text = "déf f(x):\n\treturn x  # ünïcode ✓ \x00\n"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text


@pytest.mark.parametrize("rate", [1.0, 0.0])
def test_fim_reassembles_the_original_document(tokenizer, rate):
    rng = np.random.default_rng(0)
    docs = load_documents("stdlib", 60_000)[:40] + ["", "x", "ab"]
    begin = tokenizer.token_to_id(FIM_BEGIN)
    for doc in docs:
        ids = encode_document(doc, tokenizer, rng, rate)
        assert ids[-1] == tokenizer.token_to_id(EOS)
        assert (ids[0] == begin) == (rate == 1.0)
        assert reassemble(ids, tokenizer) == doc


def test_fim_rate_is_respected(tokenizer):
    rng = np.random.default_rng(1)
    begin = tokenizer.token_to_id(FIM_BEGIN)
    n = sum(encode_document("def f(): pass", tokenizer, rng, 0.1)[0] == begin for _ in range(2000))
    assert 150 < n < 250  # 10% of 2000, well within binomial noise


def test_fim_split_covers_text():
    rng = np.random.default_rng(2)
    for _ in range(100):
        p, m, s = fim_split("abcdefghij", rng)
        assert p + m + s == "abcdefghij"


def test_packing_loses_and_duplicates_nothing():
    rng = np.random.default_rng(3)
    docs = [list(rng.integers(10, 99, size=rng.integers(1, 40))) + [1] for _ in range(57)]
    windows = pack(docs, window=17, pad_id=1)
    stream = [t for d in docs for t in d]
    flat = windows.reshape(-1)
    assert windows.shape[1] == 17
    assert list(flat[:len(stream)]) == stream
    assert np.all(flat[len(stream):] == 1) and len(flat) - len(stream) < 17


def test_pipeline_splits_documents_and_iterator_state_resumes():
    config = apply_overrides(get_preset("tiny"), ["data.source=synthetic", "train.seq_len=32", "model.vocab_size=512"])
    data = build_data(config)
    assert data.train_windows.shape[1] == 33 and len(data.val_windows) >= 1
    it = train_iterator(data.train_windows, 4, seed=0)
    [next(it) for _ in range(3)]
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = train_iterator(data.train_windows, 4, seed=0)
    again.set_state(json.loads(json.dumps(state)))
    for a in expected:
        np.testing.assert_array_equal(a, next(again))


def test_bad_data_sources(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_documents(str(tmp_path / "nope.txt"), 100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="matches no files"):
        load_documents(str(tmp_path / "empty"), 100)
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(UsageError, match="holds no text"):
        load_documents(str(tmp_path / "blank.txt"), 100)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UsageError, match="bad.jsonl:2"):
        load_documents(str(tmp_path / "bad.jsonl"), 100)


def test_jsonl_and_glob_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first doc"}\n{"text": "second doc"}\n')
    (tmp_path / "b.txt").write_text("third doc")
    assert load_documents(str(tmp_path / "*"), 10_000) == ["first doc", "second doc", "third doc"]


def test_sharded_data_gives_each_process_its_rows_of_the_same_batches():
    """data.shards = 4: a process that builds only shards [2, 3] (the second of two processes) gets
    exactly rows [8, 16) of every global batch of 16 that one process building all shards gets, and
    resumes from the saved state like it."""
    config = apply_overrides(get_preset("tiny"), ["data.source=synthetic", "train.seq_len=32", "model.vocab_size=512",
                                                  "data.shards=4", "train.batch_size=16"])
    whole = build_data(config)
    second = build_data(config, shards=shards_for_rows(8, 16, 16, 4))
    assert sorted(whole.train_shards) == [0, 1, 2, 3] and sorted(second.train_shards) == [2, 3]
    nbytes = lambda data: sum(w.nbytes for w in data.train_shards.values())
    assert nbytes(second) < 0.7 * nbytes(whole)  # the second process holds about half the packed tokens
    for shard in (2, 3):
        np.testing.assert_array_equal(second.train_shards[shard], whole.train_shards[shard])
    # Without FIM the shards hold exactly the unsharded pipeline's tokens (EOS, also the padding, aside).
    no_fim = lambda shards: apply_overrides(config, ["data.fim_rate=0", f"data.shards={shards}"])
    eos = whole.tokenizer.token_to_id(EOS)
    counts = lambda data: np.bincount(np.concatenate([w.ravel() for w in data.train_shards.values()]),
                                      minlength=512)[np.arange(512) != eos]
    np.testing.assert_array_equal(counts(build_data(no_fim(4))), counts(build_data(no_fim(1))))
    everything = ShardedBatches(whole.train_shards, 16, 4, seed=0)
    mine = ShardedBatches(second.train_shards, 16, 4, seed=0)
    batches = [next(everything) for _ in range(3)]
    for batch in batches:
        assert batch.shape == (16, 33)
        np.testing.assert_array_equal(next(mine), batch[8:])
    state = json.loads(json.dumps(mine.get_state()))
    assert state == everything.get_state()
    expected = next(everything)[8:]
    again = ShardedBatches(second.train_shards, 16, 4, seed=0)
    again.set_state(state)
    np.testing.assert_array_equal(next(again), expected)


def test_one_data_shard_is_the_plain_iterator():
    config = apply_overrides(get_preset("tiny"), ["data.source=synthetic", "train.seq_len=32", "model.vocab_size=512"])
    data = build_data(config)
    sharded, plain = ShardedBatches(data.train_shards, 4, 1, seed=0), train_iterator(data.train_windows, 4, seed=0)
    for _ in range(3):
        np.testing.assert_array_equal(next(sharded), next(plain))
    assert sharded.get_state() == plain.get_state()


@pytest.mark.parametrize("overrides, message", [
    (["data.shards=3"], "data.shards=3 must divide train.batch_size=16"),
    (["data.shards=0"], "data.shards=0 must be an integer >= 1"),
    (["data.shards=2", "train.objective=sft"], "data.shards=2 is for pretraining"),
])
def test_bad_data_shards_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("tiny"), overrides)


def test_rows_that_split_a_data_shard_are_refused():
    assert shards_for_rows(0, 16, 16, 4) == [0, 1, 2, 3]
    with pytest.raises(UsageError, match=r"rows \[6, 12\) of each batch of 16, which splits data shards of 4 rows"):
        shards_for_rows(6, 12, 16, 4)


def test_the_data_cache_returns_what_the_pipeline_computes_and_survives_damage(tmp_path, monkeypatch):
    """A second build reads the tokenizer and the windows from the cache (nothing is trained or
    tokenised), equal to the first; damaged entries are computed again; a changed setting (FIM rate)
    is a new entry, not the old windows."""
    import dsv3_jax.data.pipeline as pipeline

    monkeypatch.setenv("DSV3_DATA_CACHE", str(tmp_path))
    config = apply_overrides(get_preset("tiny"), ["data.source=synthetic", "train.seq_len=32", "model.vocab_size=512"])
    first = build_data(config)
    entries = sorted(tmp_path.iterdir())
    assert [e.name.split("-")[0] for e in entries] == ["tokenizer", "windows", "windows"]  # train + val windows

    computed = []
    with monkeypatch.context() as m:  # a read must not compute
        m.setattr(pipeline, "train_tokenizer", lambda *a: computed.append("bpe"))
        m.setattr(pipeline, "_tokenise", lambda *a: computed.append("tokens"))
        again = build_data(config)
    assert computed == [] and again.tokenizer.to_str() == first.tokenizer.to_str()
    np.testing.assert_array_equal(again.train_windows, first.train_windows)
    np.testing.assert_array_equal(again.val_windows, first.val_windows)

    for entry in entries:
        entry.write_bytes(b"damaged")
    repaired = build_data(config)
    np.testing.assert_array_equal(repaired.train_windows, first.train_windows)
    assert all(entry.read_bytes() != b"damaged" for entry in entries)

    more_fim = build_data(apply_overrides(config, ["data.fim_rate=0.9"]))
    fim_begin = first.tokenizer.token_to_id(FIM_BEGIN)
    assert (more_fim.train_windows == fim_begin).sum() > 3 * (first.train_windows == fim_begin).sum()
    assert len(list(tmp_path.iterdir())) == 4  # the new training windows; the validation set has no FIM
