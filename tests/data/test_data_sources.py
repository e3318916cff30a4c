"""Each source end to end on small local data: local directory / JSONL / Parquet, hf (through
`datasets` on local JSON files, nothing downloaded), synthetic; and the registry of sources."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe.data import DataConfig, DataError, HFDomainSpec, as_data_config, prepare_data, sources
from moe.data.corpus import Document, DomainText, TextCorpus
from moe.data.sources import Source, get_source, load_corpus, register_source, source_names
from moe.data.sources.synthetic import build_process, domain_names

CONF = Path(__file__).resolve().parents[2] / "conf"

WORDS = {
    "animals": "cat dog horse zebra lion tiger otter whale eagle falcon".split(),
    "numbers": "one two three four five six seven eight nine ten".split(),
    "colours": "red green blue cyan magenta yellow black white orange purple".split(),
}


def _docs(domain: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"{domain}:{seed}")
    return [" ".join(rng.choice(WORDS[domain]) for _ in range(120)) + f"\nend of {domain} {i}\n" for i in range(n)]


def _cfg(**kw) -> DataConfig:
    # Half of a handful of documents held out: the 2 that document resampling needs at least.
    cfg = DataConfig(
        seq_len=16,
        vocab_size=300,
        val_fraction=0.5,
        val_tokens_per_domain=64,
        max_chars_per_domain=None,
        min_val_docs_per_domain=2,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _texts_by_domain(data) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for info in data.documents:
        out.setdefault(info.domain, []).append(data.tokenizer.decode(data.doc_tokens(info.doc).tolist()))
    return out


def test_local_directory_one_subdir_per_domain(tmp_path):
    root = tmp_path / "corpus"
    for domain in ("animals", "numbers"):
        (root / domain / "sub").mkdir(parents=True)
        for i, text in enumerate(_docs(domain, 4)):
            (root / domain / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(text)
    (root / "numbers" / "image.png").write_bytes(b"\x89PNG\x00\x00")  # ignored: not a listed extension
    cfg = _cfg(source="local")
    cfg.local.path = str(root)
    data = prepare_data(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert data.domains == ["animals", "numbers"]
    got = _texts_by_domain(data)
    for domain in data.domains:
        assert sorted(got[domain]) == sorted(_docs(domain, 4))
    info = data.manifest["domains"]["numbers"]
    assert info["documents"] == 4 and any("image.png" in s for s in info["skipped"])
    assert sorted(info["sources"]) == [
        "numbers/doc0.txt",
        "numbers/doc2.txt",
        "numbers/sub/doc1.txt",
        "numbers/sub/doc3.txt",
    ]
    batch = next(data.train_stream(micro_batch_size=4))
    assert batch.tokens.shape == (4, 16)


@pytest.mark.parametrize("policy", ["replace", "skip"])
def test_non_utf8_bytes_follow_the_policy_and_are_counted(tmp_path, policy):
    root = tmp_path / "corpus"
    for domain in ("animals", "numbers"):
        (root / domain).mkdir(parents=True)
        for i, text in enumerate(_docs(domain, 3)):
            (root / domain / f"{i}.txt").write_text(text)
    # Latin-1 bytes (0xE9 0xFC) and a lone continuation byte inside otherwise UTF-8 text.
    (root / "animals" / "0.txt").write_bytes(b"caf\xe9 m\xfcller \x80 " + _docs("animals", 1)[0].encode())
    cfg = _cfg(source="local", non_utf8=policy)
    cfg.local.path = str(root)
    data = prepare_data(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert data.manifest["domains"]["animals"]["undecodable_bytes"] == 3
    assert data.manifest["domains"]["numbers"]["undecodable_bytes"] == 0
    texts = _texts_by_domain(data)["animals"]
    expected = "caf\ufffd m\ufffdller \ufffd " if policy == "replace" else "caf mller  "
    assert any(t.startswith(expected) for t in texts)


def _records(domains=("animals", "numbers", "colours"), n=4):
    rows = []
    for domain in domains:
        for i, text in enumerate(_docs(domain, n)):
            rows.append({"id": f"{domain}-{i}", "body": text, "meta": {"set": domain}})
    random.Random(0).shuffle(rows)
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_local_jsonl_records_with_dotted_domain_field(tmp_path):
    rows = _records()
    _write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = _cfg(source="local")
    cfg.local.path = str(tmp_path / "data.jsonl")
    cfg.local.text_field, cfg.local.domain_field = "body", "meta.set"
    data = prepare_data(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert data.domains == ["animals", "colours", "numbers"]
    got = _texts_by_domain(data)
    for domain in data.domains:
        assert sorted(got[domain]) == sorted(r["body"] for r in rows if r["meta"]["set"] == domain)


def test_local_parquet_directory(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = _records(("animals", "numbers"))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "pq" / "part0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "pq" / "part1.parquet")
    cfg = _cfg(source="local")
    cfg.local.path = str(tmp_path / "pq")
    cfg.local.text_field, cfg.local.domain_field = "body", "meta.set"
    data = prepare_data(cfg, seed=0, cache_dir=tmp_path / "cache")
    got = _texts_by_domain(data)
    assert data.domains == ["animals", "numbers"]
    assert sorted(got["numbers"]) == sorted(r["body"] for r in rows if r["meta"]["set"] == "numbers")


def test_local_cap_keeps_a_seeded_subset(tmp_path):
    rows = _records(("animals", "numbers"), n=10)
    _write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = _cfg(source="local", max_chars_per_domain=2500)
    cfg.local.path = str(tmp_path / "data.jsonl")
    cfg.local.text_field, cfg.local.domain_field = "body", "meta.set"
    a = prepare_data(cfg, seed=0, cache_dir=tmp_path / "c1")
    b = prepare_data(cfg, seed=5, cache_dir=tmp_path / "c2")  # the run seed does not pick documents
    for name, info in a.manifest["domains"].items():
        assert info["chars"] <= 2500 and 2 <= info["documents"] < 10
        assert info["sources"] == b.manifest["domains"][name]["sources"]


def _kept_indices(corpus, domain: str) -> list[int]:
    """Indices (0..n-1, in sorted-path / file order) of the documents a capped domain kept; each
    text starts with "<domain> <index>"."""
    d = corpus.domain_texts[corpus.domains.index(domain)]
    return [int(doc.text.split(" ", 2)[1]) for doc in d.documents]


@pytest.mark.parametrize("form", ["dir", "jsonl"])
def test_local_cap_draws_a_random_sample_seeded_by_corpus_seed(tmp_path, form):
    """A capped domain is a random sample of its documents (not the first ones in sorted or file
    order), the same one on every call with the same corpus_seed, another with another seed."""
    from moe.data.sources.local import load_local

    n, per_doc = 60, 800
    texts = {
        d: [
            f"{d} {i:03d} " + " ".join(WORDS[d][(i + j) % 10] for j in range(150))[: per_doc - 10] + "\n"
            for i in range(n)
        ]
        for d in ("animals", "numbers")
    }
    if form == "dir":
        for d, docs in texts.items():
            (tmp_path / "corpus" / d).mkdir(parents=True)
            for i, t in enumerate(docs):
                (tmp_path / "corpus" / d / f"doc{i:03d}.txt").write_text(t)
        path = tmp_path / "corpus"
    else:
        path = tmp_path / "data.jsonl"
        _write_jsonl(path, [{"text": t, "domain": d} for d, docs in texts.items() for t in docs])
    cap = 10 * per_doc
    picks = {}
    for corpus_seed in (0, 0, 1):
        cfg = _cfg(source="local", max_chars_per_domain=cap, corpus_seed=corpus_seed)
        cfg.local.path = str(path)
        corpus = load_local(cfg)
        kept = {d: _kept_indices(corpus, d) for d in corpus.domains}
        for idx in kept.values():
            assert 9 <= len(idx) <= 11 and len(set(idx)) == len(idx)
            assert idx == sorted(idx)  # listed in path / record order once picked
            assert idx != list(range(len(idx)))  # not the first files
            assert max(idx) >= n // 2  # drawn from the whole domain
        picks.setdefault(corpus_seed, []).append(kept)
    assert picks[0][0] == picks[0][1]  # reproducible
    assert picks[0][0] != picks[1][0]  # corpus_seed decides the sample
    assert picks[0][0]["animals"] != picks[0][0]["numbers"]  # each domain draws on its own


@pytest.fixture(scope="module")
def datasets_offline():
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets


def test_hf_domain_field_through_datasets(tmp_path, datasets_offline):
    rows = _records()
    _write_jsonl(tmp_path / "pile.jsonl", rows)
    cfg = _cfg(source="hf")
    cfg.hf.path, cfg.hf.data_files = "json", [str(tmp_path / "pile.jsonl")]
    cfg.hf.text_field, cfg.hf.domain_field = "body", "meta.set"
    cfg.hf.cache_dir = str(tmp_path / "hf")  # nothing written to the user's Hugging Face cache
    cfg.hf.include_domains = ["animals", "numbers"]
    cfg.hf.max_docs_per_domain = 3
    data = prepare_data(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert data.domains == ["animals", "numbers"]
    got = _texts_by_domain(data)
    for domain in data.domains:
        in_order = [r["body"] for r in rows if r["meta"]["set"] == domain]
        assert len(got[domain]) == 3 and set(got[domain]) <= set(in_order)
    # A rerun finds the cached corpus by its request.
    again = prepare_data(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert again.manifest["corpus_sha256"] == data.manifest["corpus_sha256"]


def test_hf_cap_draws_a_random_sample_seeded_by_corpus_seed(tmp_path, datasets_offline):
    from moe.data.sources.hf import load_hf, request_key

    rows = _records(("animals", "numbers"), n=30)
    _write_jsonl(tmp_path / "pile.jsonl", rows)

    def picked(corpus_seed=0, streaming=True, shuffle_buffer=10_000):
        cfg = _cfg(source="hf", corpus_seed=corpus_seed)
        cfg.hf.path, cfg.hf.data_files = "json", [str(tmp_path / "pile.jsonl")]
        cfg.hf.text_field, cfg.hf.domain_field = "body", "meta.set"
        cfg.hf.cache_dir, cfg.hf.streaming, cfg.hf.shuffle_buffer = str(tmp_path / "hf"), streaming, shuffle_buffer
        cfg.hf.max_docs_per_domain = 5
        return cfg, {d.name: [doc.text for doc in d.documents] for d in load_hf(cfg).domain_texts}

    first5 = {d: [r["body"] for r in rows if r["meta"]["set"] == d][:5] for d in ("animals", "numbers")}
    cfg0, a = picked()
    assert a == picked()[1]  # reproducible
    cfg1, b = picked(corpus_seed=1)
    assert a != b  # corpus_seed decides the sample, so it keys the cached request too
    assert request_key(cfg0) != request_key(cfg1)
    for d, docs in a.items():
        assert len(docs) == 5 and docs != first5[d]
        assert set(docs) <= {r["body"] for r in rows if r["meta"]["set"] == d}
    downloaded = picked(streaming=False)[1]  # a downloaded dataset is permuted exactly
    assert {d: len(v) for d, v in downloaded.items()} == {"animals": 5, "numbers": 5} and downloaded != first5
    assert picked(shuffle_buffer=None)[1] == first5  # null: the dataset's own order


def test_hf_one_dataset_per_domain(tmp_path, datasets_offline):
    for domain in ("animals", "colours"):
        _write_jsonl(tmp_path / f"{domain}.jsonl", [{"text": t} for t in _docs(domain, 3)])
    cfg = _cfg(source="hf")
    cfg.hf.streaming = False  # the non-streaming path builds Arrow files: keep them in tmp_path
    cfg.hf.cache_dir = str(tmp_path / "hf")
    cfg.hf.domains = {
        d: HFDomainSpec(path="json", data_files=[str(tmp_path / f"{d}.jsonl")]) for d in ("animals", "colours")
    }
    data = prepare_data(cfg, seed=0, cache_dir=tmp_path / "cache")
    got = _texts_by_domain(data)
    assert data.domains == ["animals", "colours"]
    assert sorted(got["colours"]) == sorted(_docs("colours", 3))  # all read, in a seeded order


def _synthetic(overlap: float, tmp_path, **kw) -> DataConfig:
    cfg = DataConfig(
        source="synthetic", seq_len=32, val_fraction=0.2, val_tokens_per_domain=256, min_val_docs_per_domain=2
    )
    cfg.synthetic.num_domains, cfg.synthetic.vocab_size, cfg.synthetic.overlap = 3, 60, overlap
    cfg.synthetic.tokens_per_domain, cfg.synthetic.doc_len = 12_000, 100
    for k, v in kw.items():
        setattr(cfg.synthetic, k, v)
    return cfg


def _domain_token_sets(data):
    sets = {d: set() for d in range(len(data.domains))}
    for info in data.documents:
        sets[data.domains.index(info.domain)].update(data.doc_tokens(info.doc).tolist())
    return sets


def test_synthetic_overlap_zero_gives_disjoint_domains(tmp_path):
    data = prepare_data(_synthetic(0.0, tmp_path), seed=0, cache_dir=tmp_path)
    assert data.domains == domain_names(3) and data.vocab_size == 61 and data.eos_id == 60
    sets = _domain_token_sets(data)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not sets[a] & sets[b]
    # the labels in the batches line up with those token blocks
    batch = next(data.train_stream(micro_batch_size=8))
    body = batch.tokens != data.eos_id
    for d in range(3):
        toks = set(batch.tokens[body & (batch.domain == d)].tolist())
        assert toks <= sets[d]
    assert data.tokenizer.decode([3, 60]) == "<t3><eos>" and data.tokenizer.encode("<t3><eos>") == [3, 60]


def test_synthetic_overlap_one_gives_one_process(tmp_path):
    cfg = _synthetic(1.0, tmp_path)
    process = build_process(cfg.synthetic, cfg.corpus_seed)
    for d in range(1, 3):
        np.testing.assert_array_equal(process.transition_matrix(d), process.transition_matrix(0))
        np.testing.assert_array_equal(process.initial_distribution(d), process.initial_distribution(0))
    data = prepare_data(cfg, seed=0, cache_dir=tmp_path)
    freq = []
    for d in range(3):
        toks = np.concatenate([data.doc_tokens(i.doc) for i in data.documents if i.domain == data.domains[d]])
        freq.append(np.bincount(toks, minlength=60) / toks.size)
    for d in range(1, 3):
        assert 0.5 * np.abs(freq[d] - freq[0]).sum() < 0.1  # total variation between unigram laws


def test_synthetic_overlap_interpolates(tmp_path):
    cfg = _synthetic(0.5, tmp_path)
    process = build_process(cfg.synthetic, cfg.corpus_seed)
    for d in range(3):
        P = process.transition_matrix(d)
        np.testing.assert_allclose(P.sum(axis=1), 1.0)
    data = prepare_data(cfg, seed=0, cache_dir=tmp_path)
    sets = _domain_token_sets(data)
    assert sets[0] & sets[1]  # shared steps visit other blocks


# --- the registry -----------------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the test, so sources registered in it do not leak."""
    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))


def test_registry_lists_every_source_with_its_module_and_preset():
    from moe.data.config import SOURCES

    assert SOURCES == source_names()
    assert source_names()[:4] == ("builtin", "synthetic", "local", "hf")
    shipped = sorted(
        p.stem for p in (Path(sources.__file__).parent).glob("*.py") if p.stem not in ("__init__", "math_gen")
    )
    assert sorted(source_names()) == shipped
    for name in source_names():
        source = get_source(name)
        assert isinstance(source, Source) and source.name == name and source.validate is not None
        assert source.load.__module__ == f"moe.data.sources.{name}"
        assert (CONF / "data" / f"{name}.yaml").is_file()
    assert [n for n in source_names() if not get_source(n).text] == ["synthetic"]


@pytest.mark.parametrize("call", [as_data_config, load_corpus, get_source])
def test_unknown_source_names_the_known_ones(call):
    cfg = DataConfig(source="web")
    message = r"^data\.source='web' is unknown; choose one of builtin, synthetic, local, hf$"
    with pytest.raises(DataError, match=message):
        call(cfg.source if call is get_source else cfg)


def test_a_source_is_checked_by_its_own_validate():
    cfg = DataConfig(source="local")
    cfg.local.format = "csv"
    with pytest.raises(DataError, match=r"data\.local\.format='csv' is unknown"):
        as_data_config(cfg)
    cfg.source = "builtin"  # another source's section is that source's business
    as_data_config(cfg)
    cfg = DataConfig(source="hf")
    cfg.hf.max_records = 0
    with pytest.raises(DataError, match=r"data\.hf\.max_records=0 is out of range"):
        as_data_config(cfg)


def test_a_registered_source_is_used_by_load_corpus_and_prepare_data(registry, tmp_path):
    calls = []

    def _validate(cfg: DataConfig) -> None:
        calls.append("validate")
        if cfg.corpus_seed > 5:
            raise DataError(f"data.corpus_seed={cfg.corpus_seed}: the toy source knows seeds 0-5")

    @register_source("toy", validate=_validate)
    def load_toy(cfg: DataConfig) -> TextCorpus:
        calls.append("load")
        return TextCorpus(
            [
                DomainText(
                    name, [Document(f"{name}/{i}", text) for i, text in enumerate(_docs(name, 4, seed=cfg.corpus_seed))]
                )
                for name in ("animals", "numbers")
            ],
            source="toy",
        )

    from moe.data.config import SOURCES

    assert "toy" in SOURCES and source_names()[-1] == "toy"
    corpus = load_corpus(_cfg(source="toy"))
    assert calls == ["load"] and isinstance(corpus, TextCorpus) and corpus.source == "toy"
    data = prepare_data(_cfg(source="toy"), seed=0, cache_dir=tmp_path)
    assert data.domains == ["animals", "numbers"] and "validate" in calls
    assert data.manifest["source"] == "toy"
    assert sorted(_texts_by_domain(data)["numbers"]) == sorted(_docs("numbers", 4))
    with pytest.raises(DataError, match="toy source knows seeds"):
        as_data_config(_cfg(source="toy", corpus_seed=6))
    with pytest.raises(DataError, match="choose one of builtin, synthetic, local, hf, toy"):
        get_source("web")


def test_a_taken_name_is_refused(registry):
    def load_other(cfg):
        raise AssertionError("never called")

    local = get_source("local")
    with pytest.raises(ValueError, match=r"'local' is already registered by moe\.data\.sources\.local\.load_local"):
        register_source("local")(load_other)
    del sources._REGISTRY["local"]  # as before moe.data.sources.local is first imported: still its name
    with pytest.raises(ValueError, match=r"'local' is already registered by moe\.data\.sources\.local;"):
        register_source("local")(load_other)
    sources._REGISTRY["local"] = local
    register_source("local")(local.load)  # the same loader again (a reloaded module) is fine
    register_source("toy")(load_other)
    with pytest.raises(ValueError, match=r"'toy' is already registered by .*load_other; .*load_toy cannot"):
        register_source("toy")(_load_toy)


def _load_toy(cfg):
    raise AssertionError("never called")


def test_sources_are_imported_only_when_used():
    """Listing and validating sources imports none of their heavy optional dependencies, and only the
    selected source's module."""
    code = (
        "import sys\n"
        "from moe.data import DataConfig, as_data_config\n"
        "from moe.data.sources import source_names\n"
        "source_names(); as_data_config(DataConfig(source='hf'))\n"
        "print(sorted(m for m in sys.modules if m.startswith('moe.data.sources.')), 'datasets' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['moe.data.sources.hf']", "False"]
