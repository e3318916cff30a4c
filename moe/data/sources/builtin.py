"""The builtin corpus: real multi-domain text that every Python installation carries.

Domains (one document per file / topic / problem set):
- code:  Python source of the standard library (`sysconfig.get_paths()["stdlib"]`), without tests,
         site-packages and `pydoc_data` (that is the prose).
- prose: the Python documentation shipped as `pydoc_data.topics`, one topic per document; if the
         topics do not fill the cap, module docstrings of stdlib modules that the code domain did
         not take (so no text sits in two domains).
- legal: licence texts of Python and of installed distributions (`*.dist-info/LICENSE*`,
         `COPYING*`, `NOTICE*`, `licenses/**`), deduplicated by content so that the domain is not a
         hundred copies of the MIT licence.
- math:  generated DM-Mathematics-style question/answer sets (`math_gen`).
- c:     CPython C headers from the include directory (optional domain).

Each domain takes documents in a seeded order of its sorted candidates (`corpus_seed`) until
`max_chars_per_domain`; files longer than `builtin.max_chars_per_doc` are cut at a line, and a
document whose kept text duplicates one already taken is dropped (listed under `skipped`), so no
text can sit in both splits. Installed files that are unreadable or not text are skipped and listed,
never fatal. Which files exist differs between machines and Python versions; the manifest records
what was taken and the corpus hash identifies it.
"""

from __future__ import annotations

import ast
import inspect
import io
import os
import re
import sysconfig
import tokenize
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from moe.data.config import BUILTIN_DOMAINS, DataConfig
from moe.data.corpus import DomainBudget, DomainText, TextCorpus, normalized_hash, seeded_order
from moe.data.errors import DataError
from moe.data.sources import math_gen, register_source
from moe.data.text import decode_text

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data", "test", "tests", "idle_test", "ensurepip"}
_LICENCE_NAME = re.compile(r"^(LICEN[SC]E|COPYING|NOTICE)", re.IGNORECASE)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def site_dirs() -> list[Path]:
    """Distinct site-packages directories of this interpreter (purelib and platlib may differ)."""
    paths = sysconfig.get_paths()
    out: list[Path] = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and p not in out:
            out.append(p)
    return out


def _stdlib_python_files(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out)


def _read(path: Path, policy: str, domain: DomainText, source: str) -> tuple[str, int] | None:
    """Read and decode one installed file; files that are unreadable or not text are skipped and
    listed in the manifest (the builtin corpus must not fail because one installed file is odd)."""
    try:
        return decode_text(path.read_bytes(), policy=policy, name=str(path))
    except (OSError, DataError) as e:
        domain.skipped.append(f"{source}: {type(e).__name__}: {e}")
        return None


def _fill_from_files(
    domain: DomainText, budget: DomainBudget, files: Iterable[Path], root: Path, prefix: str, policy: str
) -> None:
    for path in files:
        source = f"{prefix}/{path.relative_to(root).as_posix()}"
        got = _read(path, policy, domain, source)
        if got is not None and not budget.add(source, *got):
            break


def _code(cfg: DataConfig) -> DomainText:
    root = stdlib_dir()
    domain = DomainText("code", origin=f"Python {sysconfig.get_python_version()} stdlib at {root}")
    budget = DomainBudget(
        domain, max_chars=cfg.max_chars_per_domain, max_chars_per_doc=cfg.builtin.max_chars_per_doc, dedupe=True
    )
    files = seeded_order(_stdlib_python_files(root), cfg.corpus_seed, "code")
    _fill_from_files(domain, budget, files, root, "stdlib", cfg.non_utf8)
    return domain


def _prose(cfg: DataConfig) -> DomainText:
    from pydoc_data.topics import topics

    root = stdlib_dir()
    domain = DomainText("prose", origin=f"pydoc_data.topics of Python {sysconfig.get_python_version()}")
    budget = DomainBudget(
        domain, max_chars=cfg.max_chars_per_domain, max_chars_per_doc=cfg.builtin.max_chars_per_doc, dedupe=True
    )
    for key in seeded_order(sorted(topics), cfg.corpus_seed, "prose"):
        if not budget.add(f"pydoc-topics/{key}", topics[key]):
            return domain
    # The topics did not fill the cap: add module docstrings, from modules the code domain did not
    # take so that no text appears under two domain labels.
    taken = {doc.source for doc in _code(cfg).documents} if "code" in cfg.builtin.domains else set()
    domain.origin += f" + docstrings of stdlib modules at {root}"
    for path in seeded_order(_stdlib_python_files(root), cfg.corpus_seed, "prose-docstrings"):
        rel = path.relative_to(root).as_posix()
        if f"stdlib/{rel}" in taken:
            continue
        try:
            text, _ = decode_text(path.read_bytes(), policy=cfg.non_utf8, name=str(path))
        except (OSError, DataError):
            continue  # a module we cannot read simply offers no docstring
        doc = _module_docstring(text)
        if doc and len(doc) >= 200 and not budget.add(f"docstring/{rel}", doc):
            break
    return domain


def _module_docstring(source: str) -> str | None:
    """The module docstring, read from the first tokens only (parsing whole modules with `ast`
    would cost most of the corpus assembly time)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    try:
        for tok in tokens:
            if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING):
                continue
            if tok.type != tokenize.STRING:
                return None
            value = ast.literal_eval(tok.string)
            return inspect.cleandoc(value) if isinstance(value, str) else None
    except (tokenize.TokenError, SyntaxError, ValueError):
        return None
    return None


def _licence_files() -> Iterator[tuple[Path, Path, str]]:
    """(path, root, prefix) of licence files of Python and installed distributions, sorted."""
    root = stdlib_dir()
    for p in sorted(root.iterdir()):
        if p.is_file() and _LICENCE_NAME.match(p.name):
            yield p, root, "stdlib"
    for site in site_dirs():
        for meta in sorted(site.glob("*.dist-info")) + sorted(site.glob("*.egg-info")):
            if not meta.is_dir():
                continue
            for p in sorted(meta.iterdir()):
                if p.is_file() and _LICENCE_NAME.match(p.name):
                    yield p, site, "site-packages"
            lic = meta / "licenses"
            if lic.is_dir():
                for p in sorted(lic.rglob("*")):
                    if p.is_file():
                        yield p, site, "site-packages"


def _legal(cfg: DataConfig) -> DomainText:
    domain = DomainText("legal", origin=f"licence files of Python and site-packages {[str(s) for s in site_dirs()]}")
    budget = DomainBudget(
        domain, max_chars=cfg.max_chars_per_domain, max_chars_per_doc=cfg.builtin.max_chars_per_doc, dedupe=True
    )
    # Read every candidate first: deduplication must see all copies before the seeded pick, or
    # which copy of a licence survives would depend on the cap.
    unique: dict[str, tuple[str, str, int]] = {}
    duplicates = 0
    for path, root, prefix in _licence_files():
        source = f"{prefix}/{path.relative_to(root).as_posix()}"
        got = _read(path, cfg.non_utf8, domain, source)
        if got is None:
            continue
        # Whitespace-normalized so reflowed copies of one licence count as one.
        key = normalized_hash(got[0])
        if key in unique:
            duplicates += 1
        else:
            unique[key] = (source, got[0], got[1])
    if duplicates:
        domain.skipped.append(f"{duplicates} files: duplicate licence text")
    ordered = seeded_order(sorted(unique.values()), cfg.corpus_seed, "legal")
    for source, text, bad in ordered:
        if not budget.add(source, text, bad):
            break
    return domain


def _math(cfg: DataConfig) -> DomainText:
    domain = DomainText("math", origin=f"moe.data.sources.math_gen, corpus_seed={cfg.corpus_seed}")
    budget = DomainBudget(domain, max_chars=cfg.max_chars_per_domain)
    for source, text in math_gen.generate_documents(
        cfg.corpus_seed, max_chars=cfg.max_chars_per_domain, problems_per_doc=cfg.builtin.math_problems_per_doc
    ):
        budget.add(source, text)
    return domain


def _c(cfg: DataConfig) -> DomainText:
    root = Path(sysconfig.get_paths()["include"])
    if not root.is_dir():
        raise DataError(
            f"builtin domain 'c' needs the CPython headers, not found at {root}; install the Python "
            f"development package (e.g. python3-dev) or drop 'c' from data.builtin.domains"
        )
    domain = DomainText("c", origin=f"CPython headers at {root}")
    budget = DomainBudget(
        domain, max_chars=cfg.max_chars_per_domain, max_chars_per_doc=cfg.builtin.max_chars_per_doc, dedupe=True
    )
    files = seeded_order(sorted(p for p in root.rglob("*.h") if p.is_file()), cfg.corpus_seed, "c")
    _fill_from_files(domain, budget, files, root, "include", cfg.non_utf8)
    return domain


_DOMAINS: dict[str, Callable[[DataConfig], DomainText]] = {
    "c": _c,
    "code": _code,
    "legal": _legal,
    "math": _math,
    "prose": _prose,
}


def validate(cfg: DataConfig) -> None:
    """Checks of `data.builtin` (run by `moe.data.config.validate` when this source is selected)."""
    unknown = sorted(set(cfg.builtin.domains) - set(BUILTIN_DOMAINS))
    if unknown or not cfg.builtin.domains:
        raise DataError(
            f"data.builtin.domains={list(cfg.builtin.domains)} must be a non-empty subset of {list(BUILTIN_DOMAINS)}"
        )
    if cfg.builtin.max_chars_per_doc < 1 or cfg.builtin.math_problems_per_doc < 1:
        raise DataError("data.builtin.max_chars_per_doc and math_problems_per_doc must be positive")


@register_source("builtin", validate=validate)
def load_builtin(cfg: DataConfig) -> TextCorpus:
    """Assemble the builtin corpus for `cfg.builtin.domains` (deterministic given `cfg`)."""
    return TextCorpus((_DOMAINS[name](cfg) for name in sorted(set(cfg.builtin.domains))), source="builtin")
