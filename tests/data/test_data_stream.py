"""Invariants of the prepared data and its streams: determinism, labels, splits, resume, sharding,
mixture, validation batches, saving and reloading."""

from __future__ import annotations

import pickle
import time
import warnings

import numpy as np
import pytest
import torch

from moe.data import Batch, DataError, UpsamplingWarning, load_prepared, prepare_data


def take(stream, n):
    return [next(stream) for _ in range(n)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        for name in ("tokens", "targets", "domain", "doc"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_batches_are_int64_BS_with_shifted_targets(builtin_data):
    stream = builtin_data.train_stream(micro_batch_size=4)
    for batch in take(stream, 5):
        assert isinstance(batch, Batch)
        for t in (batch.tokens, batch.targets, batch.domain, batch.doc):
            assert t.dtype == torch.int64 and tuple(t.shape) == (4, builtin_data.seq_len)
        assert torch.equal(batch.targets[:, :-1], batch.tokens[:, 1:])
        assert int(batch.tokens.max()) < builtin_data.vocab_size
        assert batch.to("cpu").tokens.equal(batch.tokens)


def test_same_seed_gives_same_data_in_fresh_caches(tmp_path, small_cfg):
    a = prepare_data(small_cfg(), seed=3, cache_dir=tmp_path / "a")
    b = prepare_data(small_cfg(), seed=3, cache_dir=tmp_path / "b")
    assert a.manifest["corpus_sha256"] == b.manifest["corpus_sha256"]
    assert a.manifest["tokenizer"]["sha256"] == b.manifest["tokenizer"]["sha256"]
    assert_same_batches(take(a.train_stream(micro_batch_size=4), 6), take(b.train_stream(micro_batch_size=4), 6))
    assert_same_batches(a.val_batches(batch_size=8), b.val_batches(batch_size=8))


def test_other_seed_changes_split_and_order_not_corpus(builtin_data, builtin_cache, small_cfg):
    other = prepare_data(small_cfg(), seed=1, cache_dir=builtin_cache)
    assert other.manifest["corpus_sha256"] == builtin_data.manifest["corpus_sha256"]
    val0 = {d.doc for d in builtin_data.documents if d.split == "val"}
    val1 = {d.doc for d in other.documents if d.split == "val"}
    assert val0 != val1
    b0 = next(builtin_data.train_stream(micro_batch_size=4))
    b1 = next(other.train_stream(micro_batch_size=4))
    assert not torch.equal(b0.doc, b1.doc)


def _runs(doc_row):
    """(start, end) of maximal runs of equal document ids in one row."""
    change = np.flatnonzero(np.diff(doc_row)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [doc_row.size]])
    return zip(starts, ends)


def _is_subarray(needle, hay):
    if needle.size > hay.size:
        return False
    windows = np.lib.stride_tricks.sliding_window_view(hay, needle.size)
    return bool((windows == needle).all(axis=1).any())


def test_labels_name_the_document_each_token_came_from(builtin_data):
    data = builtin_data
    eos = data.eos_id
    checked_text = 0
    for batch in take(data.train_stream(micro_batch_size=8), 6) + data.val_batches(batch_size=8):
        tokens, dom, doc = batch.tokens.numpy(), batch.domain.numpy(), batch.doc.numpy()
        for row in range(tokens.shape[0]):
            for s, e in _runs(doc[row]):
                d = int(doc[row, s])
                info = data.documents[d]
                assert info.doc == d
                assert (dom[row, s:e] == data.domains.index(info.domain)).all()
                full = np.concatenate([data.doc_tokens(d), [eos]])
                run = tokens[row, s:e]
                # A validation document may enter as a prefix that ends with its EOS (val_windows).
                assert _is_subarray(run, full) or (
                    info.split == "val" and run[-1] == eos and (run.size == 1 or _is_subarray(run[:-1], full[:-1]))
                ), "tokens labelled with a document must be a slice of it"
                if e < tokens.shape[1]:  # the run ends inside the row: it ends with that doc's EOS
                    assert run[-1] == eos
                text = data.doc_text(d)
                body = run[:-1] if run[-1] == eos else run
                piece = data.tokenizer.decode(body.tolist())
                if piece.isascii() and checked_text < 200:  # partial UTF-8 sequences decode lossy
                    assert piece in text
                    checked_text += 1
    assert checked_text > 20


def test_documents_decode_to_their_text(builtin_data):
    for info in builtin_data.documents[::7]:
        assert builtin_data.tokenizer.decode(builtin_data.doc_tokens(info.doc).tolist()) == builtin_data.doc_text(
            info.doc
        )


def test_no_document_in_both_splits(builtin_data):
    data = builtin_data
    val = {d.doc for d in data.documents if d.split == "val"}
    train = {d.doc for d in data.documents if d.split == "train"}
    assert val and train and not (val & train)
    assert len(val | train) == len(data.documents)
    for name in data.domains:  # validation keeps every domain
        assert any(d.domain == name for d in data.documents if d.split == "val")
    seen_train = set()
    for batch in take(data.train_stream(micro_batch_size=8), 200):
        seen_train.update(np.unique(batch.doc.numpy()).tolist())
    assert seen_train <= train
    seen_val = set()
    for batch in data.val_batches(batch_size=8):
        seen_val.update(np.unique(batch.doc.numpy()).tolist())
    assert seen_val <= val


def test_resume_gives_the_batches_it_would_have_seen(builtin_data):
    stream = builtin_data.train_stream(micro_batch_size=4)
    take(stream, 7)
    state = pickle.loads(pickle.dumps(stream.state_dict()))
    expected = take(stream, 5)
    resumed = builtin_data.train_stream(micro_batch_size=4)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 5), expected)


def test_resume_across_epochs_and_far_positions_is_cheap(builtin_data):
    stream = builtin_data.train_stream(micro_batch_size=16)
    while stream.epoch < 2:  # cross at least two epoch boundaries
        next(stream)
    state = stream.state_dict()
    expected = take(stream, 3)
    resumed = builtin_data.train_stream(micro_batch_size=16)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 3), expected)
    far = dict(state, epoch=1_000_000, position=0)
    t0 = time.perf_counter()
    resumed.load_state_dict(far)
    next(resumed)
    assert time.perf_counter() - t0 < 1.0  # a seek, not a replay of a million epochs


def test_resume_refuses_state_of_other_data(builtin_data, builtin_cache, small_cfg):
    other = prepare_data(small_cfg(seq_len=32), seed=0, cache_dir=builtin_cache)
    state = other.train_stream(micro_batch_size=2).state_dict()
    with pytest.raises(DataError, match="different data"):
        builtin_data.train_stream(micro_batch_size=2).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_global_batch_of_one_process(builtin_data, world_size):
    mb = 2
    ranks = [builtin_data.train_stream(micro_batch_size=mb, rank=r, world_size=world_size) for r in range(world_size)]
    single = builtin_data.train_stream(micro_batch_size=mb * world_size)
    while single.epoch < 2:  # across epoch boundaries, where a tail shorter than G is skipped
        parts = [next(s) for s in ranks]
        whole = next(single)
        for name in ("tokens", "targets", "domain", "doc"):
            assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name))
    assert all(s.epoch == 2 for s in ranks)
    # A state saved on one rank resumes the others too: the position is global.
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()


def _domain_shares(data, n_batches):
    counts = np.zeros(len(data.domains))
    stream = data.train_stream(micro_batch_size=16)
    for batch in take(stream, n_batches):
        counts += np.bincount(batch.domain.numpy().ravel(), minlength=len(data.domains))
    return counts / counts.sum()


def test_default_mixture_balances_domains_of_unequal_size(builtin_data):
    sizes = np.array([builtin_data.manifest["split"][n]["train_tokens"] for n in builtin_data.domains])
    assert sizes.max() / sizes.min() > 1.2  # the domains really differ in token count
    shares = _domain_shares(builtin_data, 150)
    np.testing.assert_allclose(shares, 0.25, atol=0.04)


def test_mixture_weights_are_respected(builtin_cache, small_cfg):
    data = prepare_data(small_cfg(mixture={"code": 3.0, "math": 1.0}), seed=0, cache_dir=builtin_cache)
    shares = dict(zip(data.domains, _domain_shares(data, 150)))
    assert shares["legal"] == 0 and shares["prose"] == 0  # unlisted domains get weight 0
    assert shares["code"] == pytest.approx(0.75, abs=0.04)
    assert shares["math"] == pytest.approx(0.25, abs=0.04)
    # ...but every domain is still validated on
    assert len(data.val_batches(batch_size=4, domain="legal")) > 0


def test_a_domain_upsampled_beyond_the_limit_is_warned_about(builtin_cache, small_cfg):
    """code gets 3/4 of the stream but holds ~1/4 of the text: ~3 copies per pass, over a limit of 1.5
    (the default, 10, stays silent); the warning reaches the manifest."""
    cfg = small_cfg(mixture={"code": 3.0, "math": 1.0}, max_upsample=1.5)
    with pytest.warns(
        UpsamplingWarning,
        match=r"domain 'code' has \d+ train tokens; .* repeats them [23]\.\d+x .* "
        r"data.max_upsample=1.5",
    ):
        data = prepare_data(cfg, seed=0, cache_dir=builtin_cache)
    assert [w for w in data.manifest["warnings"] if "max_upsample" in w] == [
        w for w in data.manifest["warnings"] if w.startswith("domain 'code'")
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UpsamplingWarning)
        prepare_data(small_cfg(mixture={"code": 3.0, "math": 1.0}), seed=0, cache_dir=builtin_cache)


def test_val_batches_are_fixed_per_domain_and_capped(builtin_data):
    data = builtin_data
    cap = data.manifest["config"]["val_tokens_per_domain"]
    per_domain = []
    for i, name in enumerate(data.domains):
        batches = data.val_batches(batch_size=5, domain=name)
        assert batches and all(b.shape[0] <= 5 and b.shape[1] == data.seq_len for b in batches)
        assert all(bool((b.domain == i).all()) for b in batches)
        assert 0 < sum(b.num_tokens for b in batches) <= cap
        assert_same_batches(batches, data.val_batches(batch_size=5, domain=name))
        per_domain.append(torch.cat([b.tokens for b in batches]))
    everything = torch.cat([b.tokens for b in data.val_batches(batch_size=5)])
    assert torch.equal(everything, torch.cat(per_domain))
    with pytest.raises(DataError, match="domain='poetry' is unknown; allowed values: "):
        data.val_batches(batch_size=4, domain="poetry")


def test_global_batch_larger_than_an_epoch_is_refused(builtin_data):
    with pytest.raises(DataError, match="micro_batch_size"):
        builtin_data.train_stream(micro_batch_size=100_000)


def test_save_and_load_from_run_dir(builtin_data, builtin_cache, tmp_path):
    out = builtin_data.save(tmp_path / "run")
    assert (out / "manifest.json").exists() and (out / "tokenizer").is_dir()
    loaded = load_prepared(tmp_path / "run", cache_dir=builtin_cache)
    assert loaded.domains == builtin_data.domains and loaded.manifest == builtin_data.manifest
    assert loaded.vocab_size == builtin_data.vocab_size and loaded.eos_id == builtin_data.eos_id
    assert loaded.documents == builtin_data.documents
    assert_same_batches(loaded.val_batches(batch_size=8), builtin_data.val_batches(batch_size=8))
    text = "def f(x):\n    return x ** 2  # squared\n"
    assert loaded.tokenizer.encode(text) == builtin_data.tokenizer.encode(text)
    # With the token cache the saved run can resume its train stream.
    original = builtin_data.train_stream(micro_batch_size=4)
    take(original, 3)
    state = original.state_dict()
    again = loaded.train_stream(micro_batch_size=4)
    again.load_state_dict(state)
    assert_same_batches(take(again, 2), take(original, 2))
    # Without it (another machine) validation still works; the train stream says what to do.
    bare = load_prepared(tmp_path / "run", cache_dir=tmp_path / "empty-cache")
    assert_same_batches(
        bare.val_batches(batch_size=8, domain="math"), builtin_data.val_batches(batch_size=8, domain="math")
    )
    with pytest.raises(DataError, match="prepare_data"):
        bare.train_stream(micro_batch_size=2)
