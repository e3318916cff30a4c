"""Bad input fails early with a `DataError` that names the culprit and says what to do."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

from moe.data import DataConfig, DataError, DataFileNotFoundError, prepare_data

GOOD = "the quick brown fox jumps over the lazy dog. " * 20


def _local(path, **kw) -> DataConfig:
    cfg = DataConfig(source="local", seq_len=16, vocab_size=300, val_fraction=0.25, val_tokens_per_domain=64)
    cfg.local.path = str(path)
    for k, v in kw.items():
        setattr(cfg.local, k, v)
    return cfg


def _tree(root, spec: dict[str, dict[str, bytes | str]]):
    for domain, files in spec.items():
        (root / domain).mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            p = root / domain / name
            p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return root


def _good_domain():
    return {"a.txt": GOOD, "b.txt": GOOD.upper()}


def test_unknown_source(tmp_path):
    with pytest.raises(DataError, match=r"data\.source='web'.*choose one of builtin, synthetic, local, hf"):
        prepare_data(DataConfig(source="web"), seed=0, cache_dir=tmp_path)


def test_missing_path_is_a_file_not_found_error(tmp_path):
    with pytest.raises(DataFileNotFoundError, match=r"nowhere.*does not exist; fix the path") as e:
        prepare_data(_local(tmp_path / "nowhere"), seed=0, cache_dir=tmp_path)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


def test_unset_path(tmp_path):
    cfg = _local(tmp_path)
    cfg.local.path = None
    with pytest.raises(DataError, match=r"data\.local\.path is not set"):
        prepare_data(cfg, seed=0, cache_dir=tmp_path)


def _docs(n: int) -> dict[str, str]:
    """n distinct documents: enough that half of them held out leaves 2 for validation."""
    return {f"d{i}.txt": f"{i} {GOOD}" for i in range(n)}


def _readable(path) -> DataConfig:
    cfg = _local(path)
    cfg.val_fraction, cfg.min_val_docs_per_domain = 0.5, 2
    return cfg


def test_unreadable_file_is_skipped_and_listed_with_the_reason(tmp_path, monkeypatch):
    root = _tree(tmp_path / "c", {"x": _docs(4), "y": {**_docs(4), "b.txt": GOOD}})
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.name == "b.txt" and self.parent.name == "y":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    # Patched rather than chmod-ed: the tests may run as root, who reads anything.
    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    data = prepare_data(_readable(root), seed=0, cache_dir=tmp_path / "cache")
    info = data.manifest["domains"]["y"]
    assert info["documents"] == 4 and "y/b.txt: unreadable (Permission denied)" in info["skipped"]


def _deny_scandir(monkeypatch, denied: pathlib.Path) -> None:
    """os.scandir fails with EACCES on `denied`, as on a directory without read permission."""
    real = os.scandir

    def scandir(path="."):
        if pathlib.Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_entries_inside_a_domain_are_listed_in_the_manifest(tmp_path, monkeypatch):
    root = _tree(tmp_path / "c", {"x": _docs(4), "y": _docs(4)})
    (root / "y" / "locked").mkdir()
    (root / "y" / "locked" / "c.txt").write_text(GOOD)
    (root / "y" / "loop.txt").symlink_to(root / "y" / "loop.txt")  # unreadable even for root
    (root / "y" / "gone.txt").symlink_to(root / "y" / "nowhere.txt")
    (root / "y" / "elsewhere").symlink_to(root / "x", target_is_directory=True)
    _deny_scandir(monkeypatch, root / "y" / "locked")
    data = prepare_data(_readable(root), seed=0, cache_dir=tmp_path / "cache")
    skipped = data.manifest["domains"]["y"]["skipped"]
    assert "y/locked/: unreadable directory (Permission denied)" in skipped
    assert any(s.startswith("y/loop.txt: ") for s in skipped)
    assert "y/gone.txt: not a regular file (a broken link, socket or device?)" in skipped
    assert "y/elsewhere: symbolic link to a directory (not followed)" in skipped
    assert data.manifest["domains"]["y"]["documents"] == 4


def test_unreadable_domain_directory_is_named_as_unreadable(tmp_path, monkeypatch):
    root = _tree(tmp_path / "c", {"x": _good_domain(), "y": _good_domain()})
    _deny_scandir(monkeypatch, root / "y")
    with pytest.raises(
        DataFileNotFoundError, match=r"domain directory .*/y is unreadable \(Permission denied\); fix its permissions"
    ):
        prepare_data(_local(root), seed=0, cache_dir=tmp_path / "cache")


def test_empty_domain_directory(tmp_path):
    root = _tree(tmp_path / "c", {"x": _good_domain()})
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no files .*add documents to it"):
        prepare_data(_local(root), seed=0, cache_dir=tmp_path / "cache")


def test_domain_of_blank_files_is_empty(tmp_path):
    root = _tree(tmp_path / "c", {"x": _good_domain(), "blank": {"a.txt": "  \n", "b.txt": ""}})
    with pytest.raises(DataError, match=r"domain 'blank' .*has no documents; add text to it"):
        prepare_data(_local(root), seed=0, cache_dir=tmp_path / "cache")


def test_domain_with_one_document_cannot_be_split(tmp_path):
    root = _tree(tmp_path / "c", {"x": _good_domain(), "solo": {"only.txt": GOOD}})
    with pytest.raises(DataError, match=r"domain 'solo' has 1 document.*at least 2"):
        prepare_data(_local(root), seed=0, cache_dir=tmp_path / "cache")


def test_file_outside_domain_directories(tmp_path):
    root = _tree(tmp_path / "c", {"x": _good_domain(), "y": _good_domain()})
    (root / "README.txt").write_text("hello")
    with pytest.raises(DataError, match=r"README\.txt.*move each into"):
        prepare_data(_local(root), seed=0, cache_dir=tmp_path / "cache")


def test_binary_file(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4
    root = _tree(tmp_path / "c", {"x": _good_domain(), "y": {**_good_domain(), "pic.txt": png}})
    with pytest.raises(DataError, match=r"pic\.txt is not UTF-8 text.*convert it to UTF-8 or remove it"):
        prepare_data(_local(root), seed=0, cache_dir=tmp_path / "cache")


def test_file_in_another_encoding(tmp_path):
    koi8 = ("Съешь же ещё этих мягких французских булок, да выпей чаю. " * 10).encode("koi8_r")
    root = _tree(tmp_path / "c", {"x": _good_domain(), "y": {**_good_domain(), "ru.txt": koi8}})
    with pytest.raises(DataError, match=r"ru\.txt is not UTF-8 text \(\d+ of \d+ bytes undecodable\).*iconv"):
        prepare_data(_local(root), seed=0, cache_dir=tmp_path / "cache")


def test_missing_record_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": GOOD, "domain": "x"}) + "\n" + json.dumps({"txt": GOOD, "domain": "x"}) + "\n")
    with pytest.raises(
        DataError, match=r"d\.jsonl:2: field 'text' is missing .*\['domain', 'txt'\].*set the field name"
    ):
        prepare_data(_local(path), seed=0, cache_dir=tmp_path / "cache")


def test_missing_nested_domain_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": GOOD, "meta": {"source": "x"}}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'meta\.set' is missing \(meta has \['source'\]\)"):
        prepare_data(_local(path, domain_field="meta.set"), seed=0, cache_dir=tmp_path / "cache")


def test_invalid_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": GOOD, "domain": "x"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2 is not valid JSON"):
        prepare_data(_local(path), seed=0, cache_dir=tmp_path / "cache")


def test_unknown_mixture_domain(tmp_path):
    root = _tree(tmp_path / "c", {"x": _good_domain(), "y": _good_domain()})
    cfg = _local(root)
    cfg.mixture = {"x": 1.0, "z": 1.0}
    with pytest.raises(DataError, match=r"data\.mixture names unknown domains \['z'\]; the domains are \['x', 'y'\]"):
        prepare_data(cfg, seed=0, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("non_utf8", "ignore", r"data\.non_utf8='ignore' is unknown"),
        ("val_fraction", 1.0, r"data\.val_fraction=1\.0 must lie strictly between 0 and 1"),
        ("vocab_size", 100, r"data\.vocab_size=100 is below 257"),
        ("tokenizer", "sentencepiece", r"data\.tokenizer='sentencepiece' is unknown"),
        ("seq_len", 0, r"data\.seq_len=0 must be a positive"),
        ("min_val_docs_per_domain", 1, r"data\.min_val_docs_per_domain=1 must be at least 2"),
    ],
)
def test_bad_settings(tmp_path, field, value, pattern):
    cfg = DataConfig()
    setattr(cfg, field, value)
    with pytest.raises(DataError, match=pattern):
        prepare_data(cfg, seed=0, cache_dir=tmp_path)


def test_hf_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    cfg = DataConfig(source="hf")
    cfg.hf.path, cfg.hf.domain_field = "json", "domain"
    with pytest.raises(DataError, match=r"needs the `datasets` package: pip install"):
        prepare_data(cfg, seed=0, cache_dir=tmp_path)


def test_hf_missing_data_file(tmp_path):
    pytest.importorskip("datasets")
    cfg = DataConfig(source="hf")
    cfg.hf.path, cfg.hf.domain_field, cfg.hf.data_files = "json", "domain", [str(tmp_path / "gone.jsonl")]
    with pytest.raises(DataFileNotFoundError, match=r"gone\.jsonl' does not exist; fix the path"):
        prepare_data(cfg, seed=0, cache_dir=tmp_path)


def test_hf_without_domain_label(tmp_path):
    cfg = DataConfig(source="hf")
    cfg.hf.path = "json"
    with pytest.raises(DataError, match=r"set data\.hf\.domain_field .* or data\.hf\.domains"):
        prepare_data(cfg, seed=0, cache_dir=tmp_path)


def test_pretrained_tokenizer_without_transformers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    root = _tree(tmp_path / "c", {"x": _good_domain(), "y": _good_domain()})
    cfg = _local(root)
    cfg.tokenizer = "hf:gpt2"
    with pytest.raises(DataError, match=r"hf:gpt2 needs `transformers`: pip install"):
        prepare_data(cfg, seed=0, cache_dir=tmp_path / "cache")
