"""Shared fixtures of the data tests: small configs and one prepared builtin corpus."""

from __future__ import annotations

import pytest

from moe.data import DataConfig, prepare_data


def small_builtin(**overrides) -> DataConfig:
    """The builtin corpus shrunk to ~20 KB per domain and a 384-token BPE: prepares in ~1 s. Its
    domains hold out only 2-6 documents, so the validation-size warning is lowered to 2."""
    cfg = DataConfig(
        seq_len=64,
        vocab_size=384,
        max_chars_per_domain=20_000,
        val_fraction=0.25,
        val_tokens_per_domain=1024,
        min_val_docs_per_domain=2,
    )
    cfg.builtin.max_chars_per_doc = 3000
    cfg.builtin.math_problems_per_doc = 20
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="session")
def small_cfg():
    return small_builtin


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("moe-cache")


@pytest.fixture(scope="session")
def builtin_data(builtin_cache):
    """One prepared builtin corpus shared by every test that only reads it."""
    return prepare_data(small_builtin(), seed=0, cache_dir=builtin_cache)
