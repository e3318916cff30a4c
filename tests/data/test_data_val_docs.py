"""Enough validation documents for document-level statistics: how the validation token budget is
spread over documents, the warning / refusal when a domain has too few, and the per-split counts
the manifest records."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from moe.data import DataConfig, DataError, load_prepared, prepare_data
from moe.data.errors import ValidationDocumentsWarning
from moe.data.stream import TokenStore, val_windows

EOS = 0


def _store(lengths) -> TokenStore:
    """Document i holds tokens 1000*i + 1, 1000*i + 2, ... then EOS (lengths include the EOS)."""
    docs = [np.r_[1000 * i + np.arange(1, n), EOS] for i, n in enumerate(lengths)]
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    return TokenStore(np.concatenate(docs).astype(np.int32), offsets, np.zeros(len(lengths), np.int64))


def _packed(store: TokenStore, docs, S: int, max_tokens: int):
    """Reference: whole documents back to back, n windows of S+1 with stride S, n*S <= max_tokens."""
    stream = np.concatenate([store.tokens[store.offsets[d] : store.offsets[d + 1]] for d in docs])
    owner = np.concatenate([np.full(store.offsets[d + 1] - store.offsets[d], d) for d in docs])
    n = min(max_tokens // S, (stream.size - 1) // S)
    pos = np.arange(n)[:, None] * S + np.arange(S + 1)
    return stream[pos], owner[pos[:, :-1]]


def test_short_documents_enter_whole():
    store = _store([10] * 50)
    docs = np.random.default_rng(0).permutation(50)
    w, d = val_windows(store, docs, seq_len=8, max_tokens=64, min_docs=3)
    ref_w, ref_d = _packed(store, docs, 8, 64)
    np.testing.assert_array_equal(w, ref_w)
    np.testing.assert_array_equal(d, ref_d)
    assert w.shape == (8, 9) and np.unique(d).size == 7  # 65 tokens of 10-token documents


def test_long_documents_share_the_budget():
    """Without spreading, 321 tokens would hold one 500-token document; with min_docs=5 each of
    the first five contributes its first 64 tokens and its EOS."""
    store = _store([500] * 40)
    docs = np.arange(39, -1, -1)
    w, d = val_windows(store, docs, seq_len=16, max_tokens=320, min_docs=5)
    assert w.shape == (20, 17) and d.shape == (20, 16)
    assert list(dict.fromkeys(d.ravel().tolist())) == [39, 38, 37, 36, 35]  # the first five, in order
    stream = np.r_[w[:, :-1].ravel(), w[-1, -1]]
    owner = np.r_[d.ravel(), d[-1, -1]]
    for doc in (39, 38, 37, 36):
        run = stream[owner == doc]
        assert run.size == 65 and run[-1] == EOS
        np.testing.assert_array_equal(run[:-1], 1000 * doc + np.arange(1, 65))  # a prefix of the document
    np.testing.assert_array_equal(w[1:, 0], w[:-1, -1])  # windows still overlap by one token


def test_spreading_stops_at_one_window_per_document_but_keeps_two():
    store = _store([500] * 40)
    _, d = val_windows(store, np.arange(40), seq_len=16, max_tokens=64, min_docs=30)
    assert np.unique(d).size == 3  # 65 tokens: at most 65 // 17 = 3 documents of a window each
    _, d = val_windows(store, np.arange(40), seq_len=16, max_tokens=16, min_docs=30)
    assert np.unique(d).size == 2  # one window, still two documents (resampling needs two)
    _, d = val_windows(store, np.arange(4), seq_len=16, max_tokens=4096, min_docs=30)
    assert np.unique(d).size == 4  # fewer held out than min_docs: all of them, whole


# ---- the warning and the refusal --------------------------------------------------------------
def _local_corpus(root, n_docs: int, words: int = 60) -> None:
    for domain in ("birds", "trees"):
        (root / domain).mkdir(parents=True)
        for i in range(n_docs):
            (root / domain / f"{i:03d}.txt").write_text(f"{domain} number {i}: " + f"{domain[:-1]} {i} " * words + "\n")


def _cfg(root, **kw) -> DataConfig:
    cfg = DataConfig(
        source="local",
        seq_len=16,
        vocab_size=300,
        val_fraction=0.25,
        val_tokens_per_domain=4096,
        max_chars_per_domain=None,
    )
    cfg.local.path = str(root)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _prepare(cfg, cache):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = prepare_data(cfg, seed=0, cache_dir=cache)
    return data, [str(w.message) for w in caught if issubclass(w.category, ValidationDocumentsWarning)]


def test_one_validation_document_is_refused(tmp_path):
    _local_corpus(tmp_path / "c", 4)  # 0.25 * 4 = 1 held out
    with pytest.raises(
        DataError,
        match=r"domain 'birds' has 1 document\(s\) in its validation set .*needs at least 2"
        r".*add documents of this domain under data\.local\.path=.*data\.val_fraction",
    ):
        prepare_data(_cfg(tmp_path / "c"), seed=0, cache_dir=tmp_path / "cache")


def test_few_validation_documents_warn_naming_the_settings(tmp_path):
    _local_corpus(tmp_path / "c", 20)  # 5 held out per domain
    data, messages = _prepare(_cfg(tmp_path / "c"), tmp_path / "cache")
    assert len(messages) == 2 and data.manifest["warnings"] == messages
    for m in messages:
        assert "has 5 document(s) in its validation set" in m and "data.min_val_docs_per_domain=30" in m
        assert "data.val_fraction (now 0.25" in m and "data.local.path=" in m
    assert {c["documents"] for c in data.split_counts()["val"].values()} == {5}
    # a cap that left documents out is named, with the value that would do
    _, messages = _prepare(_cfg(tmp_path / "c", max_chars_per_domain=4000), tmp_path / "cache")
    assert messages and all("data.max_chars_per_domain (now 4000; about" in m for m in messages)
    # a lower bar, no warning
    data, messages = _prepare(_cfg(tmp_path / "c", min_val_docs_per_domain=5), tmp_path / "cache")
    assert messages == [] and data.manifest["warnings"] == []


def test_a_small_token_budget_is_named(tmp_path):
    _local_corpus(tmp_path / "c", 40, words=200)  # 10 held out, ~400 tokens each
    cfg = _cfg(tmp_path / "c", val_tokens_per_domain=64, min_val_docs_per_domain=8)
    data, messages = _prepare(cfg, tmp_path / "cache")
    assert {c["documents"] for c in data.split_counts()["val"].values()} == {3}  # 65 tokens, 17 per document
    assert len(messages) == 2 and all(
        "data.val_tokens_per_domain (now 64: 10 documents are held out but only 3 fit)" in m for m in messages
    )
    assert all("data.val_fraction" not in m for m in messages)  # enough are held out


def test_synthetic_source_names_its_own_settings(tmp_path):
    cfg = DataConfig(source="synthetic", seq_len=32, val_fraction=0.2, val_tokens_per_domain=4096)
    cfg.synthetic.num_domains, cfg.synthetic.tokens_per_domain, cfg.synthetic.doc_len = 2, 5000, 100
    _, messages = _prepare(cfg, tmp_path)
    assert len(messages) == 2 and all("data.synthetic.tokens_per_domain (now 5000)" in m for m in messages)


# ---- the counts in the manifest ---------------------------------------------------------------
def _counted(data) -> dict:
    """Documents and tokens per split and domain, counted from the batches and documents themselves."""
    out = {"train": {}, "val": {}}
    for name in data.domains:
        train = [d.doc for d in data.documents if d.domain == name and d.split == "train"]
        out["train"][name] = {"documents": len(train), "tokens": sum(data.doc_tokens(d).size + 1 for d in train)}
        batches = data.val_batches(batch_size=7, domain=name)
        docs = np.unique(np.concatenate([b.doc.numpy().ravel() for b in batches]))
        out["val"][name] = {"documents": int(docs.size), "tokens": sum(b.num_tokens for b in batches)}
        assert all(data.documents[d].split == "val" and data.documents[d].domain == name for d in docs)
    return out


def test_split_counts_match_the_split(builtin_data, builtin_cache, tmp_path):
    counts = builtin_data.split_counts()
    json.dumps(counts)
    assert counts == _counted(builtin_data)
    for name, split in builtin_data.manifest["split"].items():
        assert split["val_documents_used"] == counts["val"][name]["documents"] <= split["val_documents"]
        assert split["val_tokens_used"] == counts["val"][name]["tokens"] <= split["val_tokens"]
    builtin_data.save(tmp_path / "run")
    assert load_prepared(tmp_path / "run", cache_dir=builtin_cache).split_counts() == counts
    # a run directory written before the count was recorded: recounted from its validation batches
    path = tmp_path / "run" / "data" / "manifest.json"
    old = json.loads(path.read_text())
    for split in old["split"].values():
        del split["val_documents_used"]
    path.write_text(json.dumps(old))
    assert load_prepared(tmp_path / "run", cache_dir=tmp_path / "no-cache").split_counts() == counts


def test_split_counts_of_a_local_corpus(tmp_path):
    _local_corpus(tmp_path / "c", 40, words=200)
    data, _ = _prepare(_cfg(tmp_path / "c", val_tokens_per_domain=1024, min_val_docs_per_domain=6), tmp_path / "cache")
    counts = data.split_counts()
    assert counts == _counted(data)
    assert all(c["documents"] == 6 for c in counts["val"].values())  # 1025 tokens spread over 6 of 10
    assert all(c == {"documents": 30, "tokens": counts["train"][d]["tokens"]} for d, c in counts["train"].items())
