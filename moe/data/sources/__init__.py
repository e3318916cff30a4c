"""Data sources: each turns a `DataConfig` into a corpus of domain-labelled documents.

`load_corpus` dispatches on `cfg.source`; every loader is deterministic given the config (the run
seed plays no part: it only splits and orders the corpus later).
"""

from __future__ import annotations

from moe.data.config import SOURCES, DataConfig
from moe.data.corpus import TextCorpus, TokenCorpus
from moe.data.errors import DataError


def load_corpus(cfg: DataConfig) -> TextCorpus | TokenCorpus:
    """The corpus of `cfg.source`: `TokenCorpus` for synthetic, `TextCorpus` otherwise."""
    if cfg.source == "builtin":
        from moe.data.sources.builtin import load_builtin

        return load_builtin(cfg)
    if cfg.source == "synthetic":
        from moe.data.sources.synthetic import load_synthetic

        return load_synthetic(cfg)
    if cfg.source == "local":
        from moe.data.sources.local import load_local

        return load_local(cfg)
    if cfg.source == "hf":
        from moe.data.sources.hf import load_hf

        return load_hf(cfg)
    raise DataError(f"data.source={cfg.source!r} is unknown; choose one of {', '.join(SOURCES)}")
