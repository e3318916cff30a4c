"""Shared fixtures of the analysis tests: planted synthetic data and tiny models trained once.

Everything is session-scoped and small: 4 synthetic Markov domains over 64 token ids, 2-layer
models of width 32 with 4 experts, 50 AdamW steps (about a second each on one CPU thread).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from moe.data import DataConfig, PreparedData, prepare_data
from moe.layer import MoEConfig
from moe.model import LanguageModel, ModelConfig, dense_twin
from moe.routers import RouterConfig


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one intra-op thread, and much faster when another process
    competes for the cores (OpenMP threads spin-wait); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _hub_offline():
    """Nothing may download: the Hugging Face Hub is off for the analysis tests (and the CLI
    subprocesses they start inherit it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Module scope, so the module-scoped fixtures (set up before any function-scoped one) run on
    one thread too; restored when the module ends, so other test directories are unaffected."""
    with one_thread():
        yield


def synthetic_config(overlap: float = 0.3, **synthetic) -> DataConfig:
    cfg = DataConfig(source="synthetic", seq_len=32, val_fraction=0.2, val_tokens_per_domain=1024)
    cfg.synthetic.num_domains = 4
    cfg.synthetic.vocab_size = 64
    cfg.synthetic.tokens_per_domain = 6000
    cfg.synthetic.doc_len = 64
    cfg.synthetic.overlap = overlap
    for k, v in synthetic.items():
        setattr(cfg.synthetic, k, v)
    return cfg


def tiny_model(
    vocab_size: int,
    kind: str = "topk",
    *,
    n_layers: int = 2,
    num_experts: int = 4,
    top_k: int = 2,
    ffn: str = "moe",
    seed: int = 0,
) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        ffn=ffn,
        d_model=32,
        n_layers=n_layers,
        n_heads=2,
        moe=MoEConfig(num_experts=num_experts, top_k=top_k, expert_width=32),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert choice warns about its causal leak
        return LanguageModel(cfg, vocab_size, RouterConfig(kind=kind))


def train(model: LanguageModel, data: PreparedData, steps: int = 50, seed: int = 0) -> LanguageModel:
    """A few AdamW steps on the train stream (same order for every model)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    stream = data.train_stream(micro_batch_size=16)
    model.train()
    with one_thread():
        for _ in range(steps):
            batch = next(stream)
            model(batch.tokens, batch.targets).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="session")
def make_model():
    """`tiny_model` as a fixture: test modules must not import a conftest (several share the name)."""
    return tiny_model


@pytest.fixture(scope="session")
def analysis_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("analysis-cache")


@pytest.fixture(scope="session")
def synthetic_data(analysis_cache) -> PreparedData:
    """Four domains whose chains overlap 30%: tokens are shared, so I(D;E|T) is measurable."""
    return prepare_data(synthetic_config(0.3), seed=0, cache_dir=analysis_cache)


@pytest.fixture(scope="session")
def disjoint_data(analysis_cache) -> PreparedData:
    """overlap = 0: each domain owns a block of the vocabulary, so the token determines the domain."""
    return prepare_data(synthetic_config(0.0, vocab_size=32), seed=0, cache_dir=analysis_cache)


@pytest.fixture(scope="session")
def val_by_domain(synthetic_data) -> dict:
    return {name: synthetic_data.val_batches(batch_size=8, domain=name) for name in synthetic_data.domains}


@pytest.fixture(scope="session")
def trained_moe(synthetic_data) -> LanguageModel:
    return train(tiny_model(synthetic_data.tokenizer.vocab_size), synthetic_data)


@pytest.fixture(scope="session")
def trained_dense(synthetic_data, trained_moe) -> LanguageModel:
    """The active-matched dense twin of `trained_moe`, trained on the same stream."""
    torch.manual_seed(0)
    model = LanguageModel(dense_twin(trained_moe.cfg, "active"), synthetic_data.tokenizer.vocab_size)
    return train(model, synthetic_data)
