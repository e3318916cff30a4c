"""Hugging Face `datasets` as a source (optional dependency, imported lazily).

Two ways to get domains:
- one dataset whose records carry a domain label (`hf.domain_field`, dotted, e.g. the Pile's
  `meta.pile_set_name`), optionally restricted to `hf.include_domains`;
- one dataset per domain (`hf.domains`: name -> path/name/split/data_files/text_field).

Documents are drawn in a random order seeded by `corpus_seed` (`hf.shuffle_buffer`: a downloaded
dataset is permuted exactly, a streamed one is shuffled by shard order and through a buffer of
records, as `datasets` shuffles an `IterableDataset`) until a domain reaches `max_chars_per_domain`
or `hf.max_docs_per_domain`; streaming reads no further than that. So a capped domain is a random
sample, not the dataset's first records (which may be sorted by date, source or length). A
document's source id is `<domain>/<position in that read order>`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moe.data.config import DataConfig, HFDomainSpec
from moe.data.corpus import CORPUS_FORMAT, DomainBudget, DomainText, TextCorpus, name_salt
from moe.data.errors import DataError, DataFileNotFoundError
from moe.data.sources import register_source
from moe.data.text import get_field


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "data.source=hf needs the `datasets` package: pip install 'moe-specialization[hf]' "
            "(or use data.source=local for files on disk)"
        ) from e
    return datasets


def _open(
    spec: HFDomainSpec, *, streaming: bool, cache_dir: str | None, what: str, seed: int, shuffle_buffer: int | None
) -> Iterable[dict]:
    if not spec.path:
        raise DataError(f"{what}.path is not set; name a dataset (e.g. 'monology/pile-uncopyrighted' or 'json')")
    datasets = _datasets()
    files = list(spec.data_files) if spec.data_files else None
    for f in files or []:
        # Local data files fail here with the file named, rather than deep inside `datasets`.
        if "://" not in f and not any(c in f for c in "*?[") and not Path(f).expanduser().exists():
            raise DataFileNotFoundError(f"{what}.data_files entry {f!r} does not exist; fix the path")
    try:
        ds = datasets.load_dataset(
            spec.path,
            spec.name,
            split=spec.split,
            data_files=files,
            revision=spec.revision,
            streaming=streaming,
            cache_dir=str(Path(cache_dir).expanduser()) if cache_dir else None,
        )
    except FileNotFoundError as e:
        raise DataFileNotFoundError(
            f"{what}: dataset {spec.path!r} not found ({e}); check the name/path and network access"
        ) from e
    except (ValueError, KeyError) as e:
        raise DataError(f"{what}: cannot load {spec.path!r} (name={spec.name!r}, split={spec.split!r}): {e}") from e
    if not shuffle_buffer:
        return ds
    # A random sample of the dataset rather than its first records, reproducible from corpus_seed.
    return ds.shuffle(seed=seed, buffer_size=shuffle_buffer) if streaming else ds.shuffle(seed=seed)


def _text(record: dict, field: str, where: str) -> str:
    text = get_field(record, field, where=where)
    if not isinstance(text, str):
        raise DataError(f"{where}: text field {field!r} is a {type(text).__name__}; it must be a string")
    return text


def validate(cfg: DataConfig) -> None:
    """Checks of `data.hf` (run by `moe.data.config.validate` when this source is selected)."""
    h = cfg.hf
    for name, value in (("max_docs_per_domain", h.max_docs_per_domain), ("max_records", h.max_records)):
        if value is not None and not value >= 1:
            raise DataError(f"data.hf.{name}={value} is out of range: it must be >= 1, or null for no cap")
    if h.shuffle_buffer is not None and h.shuffle_buffer < 0:
        raise DataError(f"data.hf.shuffle_buffer={h.shuffle_buffer} must be >= 0 (0 or null: no shuffle)")


@register_source("hf", validate=validate)
def load_hf(cfg: DataConfig) -> TextCorpus:
    """Read the configured dataset(s) into a corpus."""
    h = cfg.hf
    if h.domains:
        if h.domain_field:
            raise DataError("set either data.hf.domain_field or data.hf.domains, not both")
        domains = []
        for name in sorted(h.domains):
            spec = h.domains[name]
            if isinstance(spec, dict):  # a DataConfig built in Python may hold plain dicts
                spec = HFDomainSpec(**spec)
            field = spec.text_field or h.text_field
            what = f"data.hf.domains.{name}"
            domain = DomainText(name, origin=f"hf:{spec.path} name={spec.name} split={spec.split}")
            budget = DomainBudget(domain, max_chars=cfg.max_chars_per_domain, max_docs=h.max_docs_per_domain)
            records = _open(
                spec,
                streaming=h.streaming,
                cache_dir=h.cache_dir,
                what=what,
                seed=_seed(cfg.corpus_seed, name),
                shuffle_buffer=h.shuffle_buffer,
            )
            for i, record in enumerate(records):
                if not budget.add(f"{name}/{i}", _text(record, field, f"{what} record {i}")):
                    break
            domains.append(domain)
        return TextCorpus(domains, source="hf")
    if not h.domain_field:
        raise DataError(
            "data.hf needs a domain label: set data.hf.domain_field (e.g. meta.pile_set_name) or "
            "data.hf.domains (domain -> dataset)"
        )
    spec = HFDomainSpec(path=h.path, name=h.name, split=h.split, data_files=h.data_files, revision=h.revision)
    keep = set(h.include_domains) if h.include_domains else None
    budgets: dict[str, DomainBudget] = {}
    records = _open(
        spec,
        streaming=h.streaming,
        cache_dir=h.cache_dir,
        what="data.hf",
        seed=_seed(cfg.corpus_seed, "hf"),
        shuffle_buffer=h.shuffle_buffer,
    )
    for i, record in enumerate(records):
        if h.max_records is not None and i >= h.max_records:
            break
        where = f"data.hf ({h.path}) record {i}"
        label = get_field(record, h.domain_field, where=where)
        if not isinstance(label, str) or not label:
            raise DataError(f"{where}: domain field {h.domain_field!r} is {label!r}; it must be a non-empty string")
        if keep is not None and label not in keep:
            continue
        if label not in budgets:
            budgets[label] = DomainBudget(
                DomainText(label, origin=f"hf:{h.path} {h.domain_field}={label!r}"),
                max_chars=cfg.max_chars_per_domain,
                max_docs=h.max_docs_per_domain,
            )
        budgets[label].add(f"{label}/{i}", _text(record, h.text_field, where))
        if keep is not None and len(budgets) == len(keep) and all(b.full for b in budgets.values()):
            break  # every kept domain is full: a streaming read stops here
    missing = sorted((keep or set()) - set(budgets))
    if missing:
        raise DataError(
            f"data.hf.include_domains {missing} never occur in field {h.domain_field!r} of {h.path} "
            f"(within {h.max_records or 'all'} records); fix the names or raise data.hf.max_records"
        )
    return TextCorpus([b.domain for b in budgets.values()], source="hf")


def request_key(cfg: DataConfig) -> str:
    """Key of the request (not of the text): lets a rerun find its cached corpus without streaming
    the dataset again. Local data files contribute their size and mtime, so edits are seen; a
    remote dataset is assumed unchanged unless `revision` changes (pin it to be sure)."""
    files = []
    specs = list((cfg.hf.domains or {}).values()) + [cfg.hf]
    for spec in specs:
        for f in spec.data_files or []:
            p = Path(f).expanduser()
            if p.exists():
                st = p.stat()
                files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    hf = _plain(asdict(cfg.hf))
    hf.pop("cache_dir")  # where datasets caches does not change the text
    # corpus_seed orders the records (hf.shuffle_buffer), so it picks the documents of a capped domain.
    payload = {
        "format": CORPUS_FORMAT,
        "hf": hf,
        "max_chars_per_domain": cfg.max_chars_per_domain,
        "non_utf8": cfg.non_utf8,
        "files": files,
        "corpus_seed": cfg.corpus_seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _seed(corpus_seed: int, salt: str) -> int:
    """The shuffle seed of one dataset: corpus_seed, with each domain's dataset on its own stream."""
    return (corpus_seed * 0x9E3779B1 + name_salt(salt)) % 2**32


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return (
        obj
        if obj is None or isinstance(obj, (str, int, float, bool))
        else os.fspath(obj)
        if isinstance(obj, Path)
        else str(obj)
    )
