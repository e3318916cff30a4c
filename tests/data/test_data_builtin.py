"""The builtin corpus: real text from the installation, traceable through its manifest."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest

from moe.data import DataConfig, prepare_data
from moe.data.errors import ValidationDocumentsWarning
from moe.data.sources import builtin, math_gen
from moe.data.text import decode_text


def _original(source: str) -> str:
    """The full text a builtin document was taken from, read independently of the pipeline."""
    kind, _, rest = source.partition("/")
    if kind == "stdlib":
        return decode_text((builtin.stdlib_dir() / rest).read_bytes(), policy="replace", name=rest)[0]
    if kind == "site-packages":
        for site in builtin.site_dirs():
            if (site / rest).exists():
                return decode_text((site / rest).read_bytes(), policy="replace", name=rest)[0]
        raise AssertionError(f"{source} not found")
    if kind == "pydoc-topics":
        from pydoc_data.topics import topics

        return topics[rest]
    if kind == "docstring":
        import ast

        return ast.get_docstring(ast.parse((builtin.stdlib_dir() / rest).read_text(errors="replace")))
    if kind == "math":
        module, index = rest.split("/")
        cfg = DataConfig()
        mod, problems = math_gen.problem_set(cfg.corpus_seed, int(index), 20)
        assert mod == module
        return math_gen.format_problems(problems)
    raise AssertionError(f"unexpected source {source}")


def test_every_document_is_text_of_its_source(builtin_data):
    seen_kinds = set()
    for info in builtin_data.documents:
        text = builtin_data.doc_text(info.doc)
        assert text.strip()
        assert _original(info.source).startswith(text), info.source
        seen_kinds.add((info.domain, info.source.split("/")[0]))
    assert {d for d, _ in seen_kinds} == {"code", "legal", "math", "prose"}
    assert ("prose", "pydoc-topics") in seen_kinds and ("code", "stdlib") in seen_kinds


def test_legal_domain_has_no_duplicate_licences(builtin_data):
    texts = [" ".join(builtin_data.doc_text(d.doc).split()) for d in builtin_data.documents if d.domain == "legal"]
    assert len(set(texts)) == len(texts)


def test_manifest_describes_the_corpus(builtin_data, builtin_cache):
    m = builtin_data.manifest
    json.dumps(m)  # plain data
    assert m["source"] == "builtin" and m["seed"] == 0
    assert sorted(m["domains"]) == builtin_data.domains
    for name, info in m["domains"].items():
        docs = [d for d in builtin_data.documents if d.domain == name]
        texts = [builtin_data.doc_text(d.doc) for d in docs]
        assert info["documents"] == len(docs)
        assert info["sources"] == [d.source for d in docs]
        assert info["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert 0 < info["bytes"] <= 20_000 * 4 and info["chars"] <= 20_000  # the configured cap
        assert len(info["sha256"]) == 64 and int(info["sha256"], 16) >= 0
        assert info["undecodable_bytes"] >= 0 and isinstance(info["skipped"], list)
        split = m["split"][name]
        assert split["train_documents"] + split["val_documents"] == len(docs)
        assert 2 <= split["val_documents_used"] <= split["val_documents"]
    assert m["tokenizer"]["vocab_size"] == builtin_data.vocab_size and m["tokenizer"]["eos_id"] == builtin_data.eos_id
    # The prepared corpus is cached under its hash, with the per-domain manifest next to it.
    corpus_dir = Path(builtin_cache) / "corpora" / m["corpus_sha256"]
    cached = json.loads((corpus_dir / "corpus.json").read_text())
    assert cached["sha256"] == m["corpus_sha256"] and cached["domains"] == m["domains"]


def test_domain_hash_changes_with_the_text(small_cfg):
    a = builtin.load_builtin(small_cfg())
    b = builtin.load_builtin(small_cfg(corpus_seed=1))  # other files picked
    ma, mb = a.domain_manifest(), b.domain_manifest()
    assert a.sha256 != b.sha256 and ma["code"]["sha256"] != mb["code"]["sha256"]
    assert ma["math"]["sha256"] != mb["math"]["sha256"]  # other generated problems
    again = builtin.load_builtin(small_cfg())
    assert again.sha256 == a.sha256 and again.domain_manifest() == ma


def test_cached_rerun_is_fast_and_identical(builtin_data, builtin_cache, small_cfg):
    t0 = time.perf_counter()
    again = prepare_data(small_cfg(), seed=0, cache_dir=builtin_cache)
    assert time.perf_counter() - t0 < 5.0
    assert again.manifest == builtin_data.manifest


@pytest.mark.slow
def test_default_corpus_has_enough_validation_documents(tmp_path):
    """The default config (conf/data/builtin.yaml = the schema defaults) gives every domain sizeable
    real text and >= min_val_docs_per_domain (30) documents in its validation batches, except where
    this machine has too few distinct licences for legal: then the shortfall is announced."""
    cfg = DataConfig()
    assert cfg.min_val_docs_per_domain == 30
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = prepare_data(cfg, seed=0, cache_dir=tmp_path)  # ~4 s on 2 cores
    caught = [str(w.message) for w in caught if issubclass(w.category, ValidationDocumentsWarning)]
    counts = data.split_counts()
    for name in data.domains:
        info = data.manifest["domains"][name]
        assert info["chars"] >= 150_000 and info["documents"] >= 100, (name, info["chars"], info["documents"])
        if name == "legal" and round(cfg.val_fraction * info["documents"]) < 30:
            assert any(m.startswith("domain 'legal'") and "licence" in m for m in caught)
            continue
        assert counts["val"][name]["documents"] >= 30, (name, counts["val"][name])
        assert not any(m.startswith(f"domain {name!r}") for m in caught)


def test_optional_c_domain(small_cfg):
    import sysconfig

    if not Path(sysconfig.get_paths()["include"]).is_dir():
        pytest.skip("CPython headers not installed")
    cfg = small_cfg()
    cfg.builtin.domains = ["c", "math"]
    corpus = builtin.load_builtin(cfg)
    assert corpus.domains == ["c", "math"]
    assert all(d.source.endswith(".h") for d in corpus.domain_texts[0].documents)
