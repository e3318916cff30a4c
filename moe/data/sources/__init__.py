"""Data sources: each turns a `DataConfig` into a corpus of domain-labelled documents.

A source is one module here that registers its loader (and the checks of its own config section)
under the name `data.source` selects, plus its preset `conf/data/<name>.yaml`:

    @register_source("mysource", validate=_validate)
    def load_mysource(cfg: DataConfig) -> TextCorpus: ...

and its name in `_MODULES` below, which imports the module only when that source is used (so `hf`
does not import `datasets`, nor `synthetic` build anything, unless selected). Code outside the
package (a test, a notebook) registers a source the same way, without a module entry.

`load_corpus` dispatches on `cfg.source`; every loader is deterministic given the config (the run
seed plays no part: it only splits and orders the corpus later).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from moe.data.errors import DataError

if TYPE_CHECKING:
    from moe.data.config import DataConfig
    from moe.data.corpus import TextCorpus, TokenCorpus

__all__ = ["Source", "get_source", "load_corpus", "register_source", "source_names"]

Loader = Callable[["DataConfig"], Union["TextCorpus", "TokenCorpus"]]

# Source name -> the module that registers it when imported. The order is the order of the names
# in messages (`source_names`).
_MODULES: dict[str, str] = {
    "builtin": "moe.data.sources.builtin",
    "synthetic": "moe.data.sources.synthetic",
    "local": "moe.data.sources.local",
    "hf": "moe.data.sources.hf",
}


@dataclass(frozen=True)
class Source:
    """name: the value of `data.source`; load(cfg) -> the corpus; validate(cfg): checks of the
    source's own config section, run by `moe.data.config.validate` when the source is selected
    (raises DataError naming the field); text: False for a source of token ids (a `TokenCorpus`),
    for which `data.tokenizer` and `data.vocab_size` do not apply."""

    name: str
    load: Loader
    validate: Callable[[DataConfig], None] | None = None
    text: bool = True


_REGISTRY: dict[str, Source] = {}


def register_source(
    name: str, *, validate: Callable[[DataConfig], None] | None = None, text: bool = True
) -> Callable[[Loader], Loader]:
    """Decorator: register the decorated loader as source `name` (the loader is returned unchanged).

    A second loader under a name already taken, or under the name of one of the package's sources
    (imported or not), is refused (ValueError); registering the same function again (a module
    reloaded) replaces the entry."""

    def decorate(load: Loader) -> Loader:
        old = _REGISTRY.get(name)
        owner = _qualname(old.load) if old is not None else _MODULES.get(name)
        if owner is not None and owner not in (_qualname(load), getattr(load, "__module__", None)):
            raise ValueError(
                f"data source {name!r} is already registered by {owner}; {_qualname(load)} cannot take the name"
            )
        _REGISTRY[name] = Source(name, load, validate, text)
        return load

    return decorate


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def source_names() -> tuple[str, ...]:
    """Every source `data.source` may name: the package's, then those registered at run time."""
    return tuple(dict.fromkeys([*_MODULES, *_REGISTRY]))


def get_source(name: str) -> Source:
    """The registered source `name` (importing its module on first use); DataError naming the
    known sources otherwise."""
    if name not in _REGISTRY and name in _MODULES:
        importlib.import_module(_MODULES[name])
    source = _REGISTRY.get(name)
    if source is None:
        if name in _MODULES:
            raise RuntimeError(f"{_MODULES[name]} was imported but did not register data source {name!r}")
        raise DataError(f"data.source={name!r} is unknown; choose one of {', '.join(source_names())}")
    return source


def load_corpus(cfg: DataConfig) -> TextCorpus | TokenCorpus:
    """The corpus of `cfg.source`: `TokenCorpus` for a token source (synthetic), `TextCorpus` otherwise."""
    return get_source(cfg.source).load(cfg)
