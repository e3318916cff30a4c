"""Text on local disk, in one of two layouts.

- Directory form: `path/<domain>/**/<file>` with an extension from `local.extensions`; one file is
  one document, the first-level sub-directory names the domain.
- Record form: `.jsonl` or `.parquet` files (one file, or every such file at the top of a
  directory); one record is one document, `text_field` / `domain_field` (dotted paths) name its
  text and domain.

A capped domain (`max_chars_per_domain`) is a random sample of its documents: they are offered in
a random order seeded by `corpus_seed` (a permutation of the sorted paths / record positions, so
the sample does not depend on how the file system lists a directory) until the cap is reached, the
last one cut at a line to fit. The kept documents are then listed in path / record order.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moe.data.config import LOCAL_FORMATS, DataConfig
from moe.data.corpus import DomainBudget, DomainText, TextCorpus, seeded_order
from moe.data.errors import DataError, DataFileNotFoundError
from moe.data.sources import register_source
from moe.data.text import decode_text, get_field

_RECORD_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def validate(cfg: DataConfig) -> None:
    """Checks of `data.local` (run by `moe.data.config.validate` when this source is selected)."""
    if cfg.local.format not in LOCAL_FORMATS:
        raise DataError(f"data.local.format={cfg.local.format!r} is unknown; choose one of {LOCAL_FORMATS}")


@register_source("local", validate=validate)
def load_local(cfg: DataConfig) -> TextCorpus:
    """Read the corpus at `cfg.local.path` (layout from `cfg.local.format`)."""
    lc = cfg.local
    if not lc.path:
        raise DataError("data.local.path is not set; point it at a directory or a .jsonl/.parquet file")
    root = Path(lc.path).expanduser()
    if not root.exists():
        raise DataFileNotFoundError(f"data.local.path={str(root)!r} does not exist; fix the path")
    fmt = lc.format
    if fmt == "auto":
        fmt = _detect(root)
    if fmt == "dir":
        return _load_dir(cfg, root)
    files = (
        [root]
        if root.is_file()
        else sorted(p for p in root.iterdir() if p.is_file() and _RECORD_SUFFIXES.get(p.suffix.lower()) == fmt)
    )
    if not files:
        raise DataError(f"{root} holds no {fmt} files; set data.local.format to match the files")
    return _load_records(cfg, root, files, fmt)


def _detect(root: Path) -> str:
    if root.is_file():
        fmt = _RECORD_SUFFIXES.get(root.suffix.lower())
        if fmt is None:
            raise DataError(
                f"{root} is a file but not .jsonl/.json/.parquet; point data.local.path at a directory "
                f"with one sub-directory per domain, or at record files"
            )
        return fmt
    kinds = {
        _RECORD_SUFFIXES[p.suffix.lower()]
        for p in root.iterdir()
        if p.is_file() and p.suffix.lower() in _RECORD_SUFFIXES
    }
    if len(kinds) > 1:
        raise DataError(f"{root} mixes JSONL and Parquet files; set data.local.format to the one to read")
    return kinds.pop() if kinds else "dir"


# ---- directory form ---------------------------------------------------------------------------
def _load_dir(cfg: DataConfig, root: Path) -> TextCorpus:
    if not root.is_dir():
        raise DataError(f"data.local.path={str(root)!r} is not a directory (format=dir)")
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        raise DataError(
            f"{root} has files outside a domain sub-directory ({', '.join(stray[:5])}); move each into "
            f"{root}/<domain>/ (one sub-directory per domain)"
        )
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root} has no domain sub-directories; create {root}/<domain>/ with text files")
    exts = {e.lower() for e in cfg.local.extensions}
    domains = []
    for d in dirs:
        domain = DomainText(d.name, origin=str(d))
        files = _domain_files(d, exts, domain.skipped)
        if not files:
            unreadable = [s for s in domain.skipped if "unreadable" in s]
            raise DataError(
                f"domain directory {d} has no files with extensions {sorted(exts)}; add documents to it, remove it, "
                f"or extend data.local.extensions"
                + (
                    f" (and fix the permissions of what could not be read: {'; '.join(unreadable[:3])})"
                    if unreadable
                    else ""
                )
            )
        budget = DomainBudget(domain, max_chars=cfg.max_chars_per_domain)
        for p in seeded_order(files, cfg.corpus_seed, f"local/{d.name}"):
            try:
                raw = p.read_bytes()
            except OSError as e:  # listed in the manifest; the domain goes on with its other files
                domain.skipped.append(f"{d.name}/{p.relative_to(d).as_posix()}: unreadable ({e.strerror})")
                continue
            text, bad = decode_text(raw, policy=cfg.non_utf8, name=str(p))
            if not budget.add(f"{d.name}/{p.relative_to(d).as_posix()}", text, bad):
                break
        # Keep documents in path order: the cap picked them, the order inside a domain is the
        # corpus order (and so the doc ids), which should not look shuffled to a reader.
        domain.documents.sort(key=lambda doc: doc.source)
        domains.append(domain)
    return TextCorpus(domains, source="local")


def _domain_files(d: Path, exts: set[str], skipped: list[str]) -> list[Path]:
    """The files of domain directory `d` (any depth, sorted, hidden entries left out) with an
    extension in `exts`. Everything else is listed in `skipped` with the reason: other extensions,
    unreadable sub-directories, entries that are not regular files (broken links, sockets...) and
    symbolic links to directories (not followed, as they may loop). An unreadable `d` itself is a
    DataError naming it."""
    files: list[Path] = []

    def visit(directory: Path) -> None:
        rel = f"{d.name}/{directory.relative_to(d).as_posix()}/".replace("/./", "/")
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            if directory == d:
                raise DataFileNotFoundError(
                    f"domain directory {d} is unreadable ({e.strerror}); fix its permissions or remove it"
                ) from e
            skipped.append(f"{rel}: unreadable directory ({e.strerror})")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            name = f"{rel}{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=False):
                    visit(path)
                elif entry.is_symlink() and path.is_dir():
                    skipped.append(f"{name}: symbolic link to a directory (not followed)")
                elif not entry.is_file():  # follows links: a broken one is no file
                    skipped.append(f"{name}: not a regular file (a broken link, socket or device?)")
                elif path.suffix.lower() in exts:
                    files.append(path)
                else:
                    skipped.append(f"{name}: extension not in data.local.extensions")
            except OSError as e:  # a link loop, or a directory entry that vanished
                skipped.append(f"{name}: unreadable ({e.strerror})")

    visit(d)
    return sorted(files)


# ---- record form ------------------------------------------------------------------------------
def _iter_jsonl(path: Path, policy: str) -> Iterator[tuple[str, Any, int]]:
    """(record id, record, undecodable bytes) per non-blank line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataFileNotFoundError(f"cannot read {path} ({e.strerror}); fix its permissions or the path") from e
    decode_text(raw, policy=policy, name=str(path))  # raises if the file as a whole is not text
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        text, bad = decode_text(line, policy=policy, name=where, check=False)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON ({e.msg}); fix the line or remove it") from e
        if not isinstance(record, dict):
            raise DataError(f"{where} is a JSON {type(record).__name__}, not an object; write one object per line")
        yield where, record, bad


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dev/hf dependency
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow (or use JSONL)") from e
    try:
        pf = pq.ParquetFile(path)
    except OSError as e:
        raise DataError(f"{path} is not a readable Parquet file ({e}); rewrite it or remove it") from e
    row = 0
    for batch in pf.iter_batches():
        for record in batch.to_pylist():
            yield f"{path}:row {row}", record, 0
            row += 1


def _load_records(cfg: DataConfig, root: Path, files: list[Path], fmt: str) -> TextCorpus:
    lc = cfg.local
    texts: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    for path in files:
        records = _iter_jsonl(path, cfg.non_utf8) if fmt == "jsonl" else _iter_parquet(path)
        for where, record, bad in records:
            domain = get_field(record, lc.domain_field, where=where)
            text = get_field(record, lc.text_field, where=where)
            if not isinstance(domain, str) or not domain:
                raise DataError(
                    f"{where}: domain field {lc.domain_field!r} is {domain!r}; it must be a non-empty string"
                )
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: text field {lc.text_field!r} is a {type(text).__name__}; it must be a string"
                )
            texts[domain].append((f"{path.name}:{where.rsplit(':', 1)[1]}", text, bad))
    if not texts:
        raise DataError(f"{root} holds no records; add records or point data.local.path elsewhere")
    domains = []
    for name in sorted(texts):
        domain = DomainText(name, origin=f"{root} ({fmt}, {lc.domain_field}={name!r})")
        budget = DomainBudget(domain, max_chars=cfg.max_chars_per_domain)
        order = seeded_order(list(range(len(texts[name]))), cfg.corpus_seed, f"local/{name}")
        kept = []
        for i in order:
            source, text, bad = texts[name][i]
            n_before = len(domain.documents)
            more = budget.add(source, text, bad)
            if len(domain.documents) > n_before:
                kept.append((i, domain.documents[-1]))
            if not more:
                break
        domain.documents = [doc for _, doc in sorted(kept, key=lambda t: t[0])]  # file order
        domains.append(domain)
    return TextCorpus(domains, source="local")
