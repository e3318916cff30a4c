"""`moe-export` (`analysis.hf.export`): a native MoE written as a transformers checkpoint, offline.

Tiny native models (width 32, 4 heads, 2-4 blocks, 4-8 experts, random weights with decisive
routing) are exported and loaded back with `AutoModelForCausalLM.from_pretrained`: the logits and
the routing (router logits, experts, weights) must be the native model's to float32 rounding. A run
directory with a text corpus and its BPE tokenizer is exported through the command line (in
process), and the report of the exported model
through the HF path (`analyze_hf_model`, which `moe-analyze model=hf:<dir>` runs, tokenizing the
text again with the exported tokenizer) must route every validation token as the native run's
report does (`analyze_run`): same per-token experts, same domain x expert counts, same NMI.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from analysis.hf.adapter import wrap_hf_model  # noqa: E402
from analysis.hf.export import ExportError, export_hf, plan_export  # noqa: E402
from analysis.hf.run import analyze_hf_model  # noqa: E402
from analysis.records import RoutingRecords  # noqa: E402
from analysis.report import AnalysisConfig  # noqa: E402
from analysis.run import analyze_run  # noqa: E402
from moe.checkpoint import checkpoint_dir, save_checkpoint  # noqa: E402
from moe.config import as_plain_dict  # noqa: E402
from moe.data import DataConfig, load_prepared, prepare_data  # noqa: E402
from moe.layer import MoEConfig  # noqa: E402
from moe.model import LanguageModel, ModelConfig  # noqa: E402
from moe.routers import router_config  # noqa: E402

VOCAB = 97
# Loading a model without shared experts initializes its width-0 shared expert first (torch warns).
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")


def native(
    vocab: int = VOCAB,
    *,
    kind: str = "topk",
    renormalize: bool = True,
    seed: int = 0,
    n_layers: int = 3,
    moe_every: int = 1,
    tie: bool = True,
    **moe,
) -> LanguageModel:
    """A tiny native LM whose weights look trained: decisive routing, non-unit norms, logits of order 1-10."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        moe_every=moe_every,
        tie_embeddings=tie,
        init_std=0.1,
        rope_theta=500.0,
        moe=MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_width": 16, **moe}),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert choice warns about its causal leak
        fields = {"renormalize": renormalize} if kind in ("topk", "sigmoid") else {}  # the gates that have it
        model = LanguageModel(cfg, vocab, router_config(kind, **fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
        for layer in model.moe_layers:
            if hasattr(layer.router, "weight"):
                layer.router.weight.normal_(0.0, 0.5)
            if hasattr(layer.router, "expert_bias"):
                layer.router.expert_bias.normal_(0.0, 0.3)  # the aux-free bias must matter
    return model.eval()


# id -> (native model kwargs, the family chosen)
CASES = {
    "mixtral": (dict(), "mixtral"),
    "mixtral-untied-top1": (dict(tie=False, top_k=1), "mixtral"),
    "qwen2-olmoe-rule": (dict(renormalize=False, num_experts=8), "qwen2_moe"),
    "qwen2-switch": (dict(kind="switch", top_k=1), "qwen2_moe"),
    "qwen2-shared-dense-blocks": (dict(num_shared_experts=1, moe_every=2, n_layers=4), "qwen2_moe"),
    "qwen2-fine-grained-renormalized": (dict(granularity=2, num_shared_experts=2), "qwen2_moe"),
    "glm4-deepseek-v3-rule": (dict(kind="sigmoid", num_experts=8, num_shared_experts=1), "glm4_moe"),
    "glm4-first-dense-unnormalized": (dict(kind="sigmoid", renormalize=False, moe_every=2, n_layers=2), "glm4_moe"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_model_computes_the_native_models_logits_and_routing(case, tmp_path):
    """Logits to float32 rounding; per MoE layer the same raw router logits, experts and weights (the
    HF side recorded by the analysis adapter, which reads the gate's own decision)."""
    kwargs, family = CASES[case]
    model = native(**kwargs)
    result = export_hf(model, tmp_path / "hf")
    assert result.model_type == family and result.max_logit_diff is not None and result.max_logit_diff < 1e-5
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    hf = wrap_hf_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"))
    assert hf.hf.config.model_type == family
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens)
    assert ours.logits.abs().max() > 1.0  # not a near-zero comparison
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=0, atol=1e-5)
    assert [layer.block_index for layer in hf.moe_layers] == [i for i, b in enumerate(model.blocks) if b.is_moe]
    for a, b in zip(theirs.routings, ours.routings, strict=True):
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
        a_idx, a_order = a.indices.sort(-1)
        b_idx, b_order = b.indices.sort(-1)
        assert torch.equal(a_idx, b_idx)
        torch.testing.assert_close(a.weights.gather(1, a_order), b.weights.gather(1, b_order), rtol=0, atol=1e-6)
    if kwargs.get("tie", True):
        assert hf.hf.lm_head.weight is hf.hf.model.embed_tokens.weight


def test_bfloat16_export_keeps_the_correction_bias_in_float32(tmp_path):
    from safetensors import safe_open

    export_hf(native(kind="sigmoid"), tmp_path / "hf", dtype="bfloat16")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == "glm4_moe"
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes["model.layers.0.mlp.gate.e_score_correction_bias"] == "F32"  # (and the weight, where declared)
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert hf.model.layers[0].mlp.gate.e_score_correction_bias.dtype == torch.float32


REFUSED = {
    "expert_choice": (dict(kind="expert_choice"), None, "each expert picks its tokens"),
    "hash": (dict(kind="hash"), None, "hash of the token id"),
    "prev_hash": (dict(kind="prev_hash"), None, "previous token id"),
    "random": (dict(kind="random"), None, "at random"),
    "domain": (dict(kind="domain"), None, "domain label"),
    "capacity": (dict(capacity_factor=1.0), None, "capacity_factor=1.0"),
    "gelu": (dict(activation="gelu"), None, "SwiGLU"),
    "olmoe-qk-norm": (dict(renormalize=False), "olmoe", "q_norm, k_norm"),
    "qwen3-qk-norm": (dict(), "qwen3_moe", "q_norm, k_norm"),
    "deepseek-v3-mla": (dict(kind="sigmoid"), "deepseek_v3", "multi-head latent attention.*glm4_moe"),
    "mixtral-no-renorm": (dict(renormalize=False), "mixtral", "always renormalizes"),
    "mixtral-shared": (dict(num_shared_experts=1), "mixtral", "no shared experts"),
    "mixtral-dense-blocks": (dict(moe_every=2, n_layers=4), "mixtral", "dense blocks"),
    "glm4-interleaved-dense": (dict(kind="sigmoid", moe_every=2, n_layers=4), "glm4_moe", "can only come first"),
    "glm4-softmax": (dict(), "glm4_moe", "sigmoid scores"),
    "qwen2-sigmoid": (dict(kind="sigmoid"), "qwen2_moe", "softmax top-k"),
    "unknown-family": (dict(), "llama", "unknown"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_no_family_can_express_is_refused_by_name_before_writing(case, tmp_path):
    kwargs, family, match = REFUSED[case]
    with pytest.raises(ExportError, match=match):
        export_hf(native(**kwargs), tmp_path / "hf", family)
    assert not (tmp_path / "hf").exists()


def test_several_problems_are_named_together_and_a_dense_model_is_refused():
    with pytest.raises(ExportError, match="router=hash.*capacity_factor.*SwiGLU"):
        plan_export(native(kind="hash", capacity_factor=2.0, activation="gelu"))
    torch.manual_seed(0)
    dense = LanguageModel(ModelConfig(ffn="dense", d_model=32, n_layers=2, n_heads=4), VOCAB)
    with pytest.raises(ExportError, match="no MoE layer"):
        plan_export(dense)


def test_a_transformers_release_that_computes_otherwise_is_caught_before_writing(tmp_path, monkeypatch):
    """The verification: with HF's rotary embedding taken as interleaved (ours) the logits differ."""
    import analysis.hf.export as export

    monkeypatch.setattr(export, "_rope_rows", lambda w, n_heads: w)
    with pytest.raises(ExportError, match="logits differ"):
        export_hf(native(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- a run directory, both analysis paths
TEXTS = {
    "code": [
        "def add(x, y):\n    return x + y\n",
        "for i in range(10):\n    print(i * i)\n",
        "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
        "import os\nprint(sorted(os.listdir('.')))\n",
    ],
    "prose": [
        "the cat sat on the mat and looked at the rain",
        "a small dog ran across the field to the children",
        "old letters tell of summers by the sea and the smell of salt",
        "she opened the window to the morning",
    ],
}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A moe-train-shaped run directory: data/ (two text domains, their BPE tokenizer, validation
    windows) and one checkpoint of a native DeepSeek-V3-style MoE (sigmoid router, shared expert,
    first block dense), without training."""
    root = tmp_path_factory.mktemp("export-run")
    corpus = root / "corpus"
    for domain, texts in TEXTS.items():
        (corpus / domain).mkdir(parents=True)
        for i in range(24):
            (corpus / domain / f"{i}.txt").write_text(f"{texts[i % len(texts)]} ({i})")
    data_cfg = DataConfig(
        source="local",
        seq_len=16,
        vocab_size=300,
        val_fraction=0.5,
        val_tokens_per_domain=320,
        min_val_docs_per_domain=2,
    )
    data_cfg.local.path = str(corpus)
    run = root / "run"
    prepared = prepare_data(data_cfg, seed=0)
    prepared.save(run)
    model = native(prepared.vocab_size, kind="sigmoid", num_shared_experts=1, moe_every=2, n_layers=2)
    state = {
        "model": model.state_dict(),
        "step": 1,
        "fingerprint": {"model": as_plain_dict(model.cfg)},
        "config": {"router": as_plain_dict(router_config("sigmoid"))},
    }
    save_checkpoint(checkpoint_dir(run, "moe"), 1, state, keep_last=1)
    return run, data_cfg


def test_moe_export_cli_writes_a_checkpoint_with_the_runs_tokenizer(text_run, tmp_path, monkeypatch):
    """`moe-export run_dir=... out_dir=...`, in process (the Hydra app, as the console script runs it)."""
    import logging

    from analysis.hf import export

    run, _ = text_run
    out = tmp_path / "hf"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["moe-export", f"run_dir={run}", f"out_dir={out}"])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        export.main()
    finally:  # Hydra configured logging for the job
        root.handlers[:], root.level = handlers, level
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # Hydra wrote nothing of its own
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm4_moe"
    assert config["first_k_dense_replace"] == 1 and config["n_shared_experts"] == 1
    assert config["max_position_embeddings"] == 16  # the run's seq_len
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prepared = load_prepared(run)
    text = TEXTS["code"][0]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == prepared.tokenizer.encode(text)
    assert tokenizer.eos_token_id == prepared.eos_id == config["eos_token_id"]
    with pytest.raises(ExportError, match="not empty"):
        export_hf(run, out)
    assert export_hf(run, out, overwrite=True).tokenizer
    with pytest.raises(ValueError, match="not a moe-train run directory"):
        monkeypatch.setattr(sys, "argv", ["moe-export", f"run_dir={tmp_path}", f"out_dir={tmp_path / 'other'}"])
        monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
        try:
            export.main()
        finally:
            root.handlers[:], root.level = handlers, level


def test_the_exported_model_is_analyzed_as_the_native_run(text_run, tmp_path):
    """Two analysis paths, one model: `analyze_run` on the run directory and `analyze_hf_model` on
    the export (data prepared again from the text with the exported tokenizer)."""
    run, data_cfg = text_run
    export_hf(run, tmp_path / "hf")
    cfg = AnalysisConfig(n_permutations=20, n_bootstrap=20, knockouts=False, probes=False)
    ours = analyze_run(run, cfg, twin=None, batch_size=4, out_dir=tmp_path / "native")
    theirs = analyze_hf_model(
        str(tmp_path / "hf"), dataclasses.replace(data_cfg), tmp_path / "exported", cfg, batch_size=4
    )
    assert theirs["model"]["family"] == "GLM-4-MoE"
    assert ours["domains"] == theirs["domains"] and ours["tokens"] == theirs["tokens"]
    a, b = (RoutingRecords.load(tmp_path / d / "routing.npz") for d in ("native", "exported"))
    np.testing.assert_array_equal(a.token, b.token)
    np.testing.assert_array_equal(a.domain, b.domain)
    assert len(a.layers) == len(b.layers) == 1
    for la, lb in zip(a.layers, b.layers):
        np.testing.assert_array_equal(np.sort(la.experts, axis=1), np.sort(lb.experts, axis=1))
        np.testing.assert_allclose(np.sort(la.gates, axis=1), np.sort(lb.gates, axis=1), rtol=1e-5, atol=1e-6)
    for la, lb in zip(ours["layers"], theirs["layers"]):
        assert la["block"] == lb["block"] == 1
        assert la["domain_expert_counts"] == lb["domain_expert_counts"]
        assert la["measures"]["nmi"]["plugin"] == pytest.approx(lb["measures"]["nmi"]["plugin"], abs=1e-12)
        assert la["measures"]["nmi"]["value"] == pytest.approx(lb["measures"]["nmi"]["value"], abs=1e-12)
        assert la["measures"]["mi_token"]["value"] == pytest.approx(lb["measures"]["mi_token"]["value"], abs=1e-12)
    for domain, loss in ours["comparison"]["moe"].items():
        assert theirs["comparison"]["moe"][domain] == pytest.approx(loss, rel=1e-5)
