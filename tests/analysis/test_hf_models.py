"""Pretrained HF MoE models through the analysis (`analysis.hf`), offline.

One tiny randomly initialized model per family (hidden 32, 2-3 layers, 4-8 experts, vocabulary
320) is saved with `save_pretrained` and loaded back the way a Hub name is
(`AutoModelForCausalLM.from_pretrained(path)`). The recorded routing is compared with the model's
own: its router logits (`output_router_logits=True`, where the release returns them), its gates
called on the captured block inputs, and the family's rule written out again here in float64.
Knockouts are checked at the output of the knocked-out layer's MoE block, before attention mixes
tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from analysis.hf import load_hf_model  # noqa: E402
from analysis.hf.adapter import HFMoEModel  # noqa: E402
from analysis.hf.families import family_of  # noqa: E402
from analysis.hf.rules import SoftmaxTopK  # noqa: E402
from analysis.hf.run import hf_data_config  # noqa: E402
from analysis.knockout import expert_masked, top1_dropped  # noqa: E402
from analysis.recorder import RoutingRecorder  # noqa: E402
from moe.data import DataConfig  # noqa: E402
from moe.data.batch import Batch  # noqa: E402

VOCAB = 320
EOS = "<|endoftext|>"
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    # Block 1 dense: MoE layers are found by structure, not assumed in every block.
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        mlp_only_layers=[1],
        shared_expert_intermediate_size=32,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16, norm_topk_prob=True),
    "deepseek_v2": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
    ),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    # DeepSeek-V3's gate with ordinary attention (what moe-export writes a router=sigmoid model as).
    "glm4_moe": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        n_group=2,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
        num_mtp_layers=0,
    ),
}
# (device, dtype): float32 checks the rules against float64 references; bf16 is what runs on GPUs.
PRECISIONS = [
    pytest.param(("cpu", "float32"), id="cpu-fp32"),
    pytest.param(("cpu", "bfloat16"), id="cpu-bf16"),
    pytest.param(
        ("cuda", "bfloat16"),
        id="cuda-bf16",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]
DOMAINS = {
    "prose": [
        "the cat sat on the mat and looked at the garden while the rain fell softly on the roof",
        "a small dog ran across the field to meet the children who were walking home from school",
        "old letters tell of summers by the sea, long evenings and the smell of salt in the air",
        "she opened the window, and the morning light came in with the sound of birds and bells",
    ],
    "code": [
        "def add(x, y):\n    return x + y\n\nfor i in range(10):\n    print(add(i, i * 2))\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
        "        self.items.append(x)\n",
        "import os\nfor name in sorted(os.listdir('.')):\n    if name.endswith('.py'):\n        print(name)\n",
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    ],
}


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([t for texts in DOMAINS.values() for t in texts], trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    """family -> a saved tiny model directory (weights, config, tokenizer)."""
    root = tmp_path_factory.mktemp("hf-models")
    tokenizer = _tokenizer()
    paths = {}
    for i, (model_type, extra) in enumerate(FAMILIES.items()):
        config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **extra})
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for layer in model.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None and hasattr(layer.mlp, "experts"):
                    gate.weight.normal_(0.0, 0.5)  # decisive routing, not near-uniform
                    if hasattr(gate, "e_score_correction_bias"):
                        gate.e_score_correction_bias.normal_(0.0, 0.3)  # the bias must matter
        model.save_pretrained(root / model_type)
        tokenizer.save_pretrained(root / model_type)
        paths[model_type] = root / model_type
    return paths


def _batch(seed: int = 0, rows: int = 3, seq: int = 12) -> Batch:
    g = torch.Generator().manual_seed(seed)
    window = torch.randint(1, 300, (rows, seq + 1), generator=g)
    doc = torch.arange(rows)[:, None].expand(rows, seq).contiguous()
    return Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous(), torch.zeros(rows, seq, dtype=torch.long), doc)


# ----------------------------------------------------------------------------- reference rules (float64)
def reference_routing(model_type: str, config, logits, gate, mask=None):
    """(experts as sorted rows [T, K], weights in that order) from router logits, per family, in
    float64, written from the papers' / transformers' formulas; `mask` removes experts from selection."""
    logits = logits.double()
    k = config.num_experts_per_tok
    neg = float("-inf")
    if model_type in ("deepseek_v3", "glm4_moe"):
        s = logits.sigmoid()
        choice = s + gate.e_score_correction_bias.double()
        t, e = choice.shape
        grouped = choice.view(t, config.n_group, e // config.n_group)
        best = grouped.topk(2, dim=-1).values.sum(-1).topk(config.topk_group, dim=-1).indices
        keep = torch.zeros(t, config.n_group, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // config.n_group, dim=1), neg)
        if mask is not None:  # knockouts act within the groups the intact model chose
            choice = choice.masked_fill(~mask, neg)
        idx = choice.topk(k, dim=-1).indices
        w = s.gather(1, idx)
        if config.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        w = w * config.routed_scaling_factor
    else:
        p = logits.softmax(-1)
        sel = p
        if model_type == "deepseek_v2":
            t, e = p.shape
            best = sel.view(t, config.n_group, -1).max(-1).values.topk(config.topk_group, dim=-1).indices
            keep = torch.zeros(t, config.n_group, dtype=torch.bool).scatter_(1, best, True)
            sel = sel.masked_fill(~keep.repeat_interleave(e // config.n_group, dim=1), neg)
        if mask is not None:
            sel = sel.masked_fill(~mask, neg)
        idx = sel.topk(k, dim=-1).indices
        w = p.gather(1, idx)
        if model_type == "mixtral" or (model_type != "deepseek_v2" and config.norm_topk_prob):
            w = w / w.sum(-1, keepdim=True)
        if model_type == "deepseek_v2":
            w = w * config.routed_scaling_factor
    idx, order = idx.sort(-1)
    return idx, w.gather(1, order)


def _sorted(indices, weights):
    idx, order = indices.long().sort(-1)
    return idx, weights.gather(1, order)


# ----------------------------------------------------------------------------- recording
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_recorded_routing_is_the_models_own(tiny_paths, model_type, precision):
    device, dtype = precision
    model = load_hf_model(str(tiny_paths[model_type]), device=device, dtype=dtype)
    config = model.hf.config
    batch = _batch()
    tokens = batch.tokens.to(device)
    inputs = {}
    pre = [
        layer.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
        for i, layer in enumerate(model.moe_layers)
    ]
    with torch.no_grad(), RoutingRecorder(model, num_domains=1) as rec:
        rec.observe(batch)
        out = model.hf(input_ids=tokens, output_router_logits=True)
    for h in pre:
        h.remove()
    records = rec.result().records
    model.remove_hooks()  # the gates below run as the model runs them, with no adapter
    expected_blocks = [i for i, layer in enumerate(model.hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert [layer.block_index for layer in model.moe_layers] == expected_blocks
    # Some releases return no router logits for a family (DeepSeek-V2/V3 and GLM-4-MoE in 5.15).
    router_logits = getattr(out, "router_logits", None)
    assert len(model.moe_layers) == len(records.layers) == len(router_logits or records.layers)
    for l, layer in enumerate(model.moe_layers):
        rec_idx, rec_w = _sorted(torch.from_numpy(records.layers[l].experts), torch.from_numpy(records.layers[l].gates))
        # 1. the gate's own decision on the same inputs, exactly
        with torch.no_grad():
            own_logits, own_w, own_idx = layer.gate(inputs[l])
        idx, w = _sorted(own_idx.cpu(), own_w.float().cpu())
        assert torch.equal(rec_idx, idx)
        assert torch.equal(rec_w, w)
        if router_logits is not None:
            assert torch.equal(router_logits[l], own_logits)
        assert records.layers[l].kept.all()
        if dtype != "float32":
            continue  # bf16 logits tie often enough that a float64 reference may break ties otherwise
        # 2. the family's rule from the raw router logits, rewritten here in float64 (not from
        # `out.router_logits`: some 5.x releases, 5.0 among them, return softmaxed values there, #45120)
        raw = F.linear(inputs[l].float(), layer.gate.weight.float())
        ref_idx, ref_w = reference_routing(model_type, config, raw, layer.gate)
        assert torch.equal(rec_idx, ref_idx)
        torch.testing.assert_close(rec_w.double(), ref_w, rtol=1e-5, atol=1e-6)


def _gate_outputs(model):
    """Per MoE layer, the list its gate's own outputs are appended to (a hook after the adapter's,
    which leaves an unmasked gate's output untouched), and the hook handles."""
    outputs = [[] for _ in model.moe_layers]
    handles = [
        layer.gate.register_forward_hook(lambda m, a, o, out=out: out.append(o))
        for layer, out in zip(model.moe_layers, outputs)
    ]
    return outputs, handles


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_captured_router_scores_are_raw_logits_and_the_rule_picks_the_gates_experts(tiny_paths, model_type):
    """transformers issue #45120: some 5.x releases returned softmaxed values as `router_logits`
    (Mixtral, Qwen2-MoE, OLMoE). Whatever the release, the record holds raw logits, x W^T of the
    gate's input (rows do not sum to 1), and the family's rule on them picks the gate's own experts."""
    model = load_hf_model(str(tiny_paths[model_type]), dtype="float32")
    inputs = {}
    pre = [
        layer.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
        for i, layer in enumerate(model.moe_layers)
    ]
    gate_out, handles = _gate_outputs(model)
    with torch.no_grad():
        routings = model(_batch(3).tokens).routings
    for h in pre + handles:
        h.remove()
    assert len(routings) == len(model.moe_layers)
    for l, (layer, routing) in enumerate(zip(model.moe_layers, routings)):
        raw = F.linear(inputs[l].double(), layer.gate.weight.double())
        torch.testing.assert_close(routing.logits.double(), raw, rtol=1e-5, atol=1e-5)
        sums = routing.logits.sum(-1)
        assert (routing.logits < 0).any() and ((sums - 1).abs() > 1e-2).float().mean() > 0.9
        assert routing.probs.sum(-1).sub(1).abs().max() < 1e-5  # the distribution is `probs`, not `logits`
        chosen = layer.rule.select(routing.logits, None, layer.gate)
        own_indices = next(t for t in gate_out[l][0] if isinstance(t, torch.Tensor) and not t.is_floating_point())
        assert torch.equal(chosen.indices.sort(-1).values, own_indices.long().sort(-1).values)
        assert torch.equal(routing.indices.sort(-1).values, own_indices.long().sort(-1).values)


def test_a_release_that_returns_softmaxed_router_logits_is_still_recorded_raw(tiny_paths):
    """The #45120 behaviour itself, simulated: the Mixtral gate returns softmax(logits) in the
    router-logits slot. The record still holds the raw logits and the same experts."""
    model = load_hf_model(str(tiny_paths["mixtral"]), dtype="float32")
    tokens = _batch(4).tokens
    with torch.no_grad():
        before = model(tokens).routings
    gates = [layer.gate for layer in model.moe_layers]
    originals = [g.forward for g in gates]

    def softmaxed(self, hidden_states, original):
        logits, weights, indices = original(hidden_states)
        return logits.softmax(-1), weights, indices

    for gate, original in zip(gates, originals):
        gate.forward = types.MethodType(lambda self, h, o=original: softmaxed(self, h, o), gate)
    with torch.no_grad():
        after = model(tokens).routings
        hf_out = model.hf(input_ids=tokens, output_router_logits=True)
    assert torch.allclose(hf_out.router_logits[0].sum(-1), torch.ones(1))  # the simulated release
    for a, b in zip(before, after):
        assert torch.equal(a.logits, b.logits) and torch.equal(a.indices, b.indices)
        assert not torch.allclose(b.logits.sum(-1), torch.ones(1))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_knockout_changes_exactly_the_tokens_that_used_the_expert(tiny_paths, model_type, precision):
    device, dtype = precision
    model = load_hf_model(str(tiny_paths[model_type]), device=device, dtype=dtype)
    config = model.hf.config
    tokens = _batch(1, rows=4, seq=16).tokens.to(device)
    l = len(model.moe_layers) - 1
    layer = model.moe_layers[l]
    block_out = []
    handle = layer.block.register_forward_hook(lambda m, a, o: block_out.append(o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        base = model(tokens).routings[l]
        used = torch.bincount(base.indices.reshape(-1), minlength=layer.router.num_experts)
        e = int(used.argmax())  # the most used expert: some tokens use it, some do not
        hit = (base.indices == e).any(-1)
        assert hit.any() and not hit.all()
        with expert_masked(layer, e):
            ko = model(tokens).routings[l]
        after = model(tokens).routings[l]
    handle.remove()
    y_base, y_ko, y_after = block_out
    assert torch.equal(y_after, y_base) and torch.equal(after.indices, base.indices)  # the mask was restored
    assert not (ko.indices == e).any()
    assert torch.equal(ko.indices[~hit], base.indices[~hit]) and torch.equal(ko.weights[~hit], base.weights[~hit])
    changed = (y_ko != y_base).any(-1)
    assert not changed[~hit].any(), "tokens that did not use the knocked-out expert must not change"
    assert (ko.indices[hit] != base.indices[hit]).any(-1).all()
    if dtype != "float32":
        return  # in bf16 a low-weight slot's new expert can vanish in rounding; float32 shows every change
    assert changed[hit].all(), "the knockout must change exactly the tokens that used the expert"
    # the re-routed tokens take their next choice by the family's rule
    mask = torch.ones(layer.router.num_experts, dtype=torch.bool)
    mask[e] = False
    ref_idx, ref_w = reference_routing(model_type, config, base.logits, layer.gate, mask)
    ko_idx, ko_w = _sorted(ko.indices, ko.weights)
    assert torch.equal(ko_idx, ref_idx)
    torch.testing.assert_close(ko_w.double(), ref_w, rtol=1e-5, atol=1e-6)


def test_top1_knockout_drops_each_tokens_highest_gate_expert(tiny_paths):
    """OLMoE (no renormalization, no shared expert): the block output with the top-1 slot dropped is
    the other experts' gated sum, computed here from `HFExperts.expert_forward` (the CKA probes' path)."""
    model = load_hf_model(str(tiny_paths["olmoe"]))
    layer = model.moe_layers[0]
    batch = _batch(2)
    captured = {}
    pre = layer.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))
    post = layer.block.register_forward_hook(lambda m, a, o: captured.__setitem__("y", o.reshape(-1, o.shape[-1])))
    with torch.no_grad(), top1_dropped(layer):
        routing = model(batch.tokens).routings[0]
    pre.remove()
    post.remove()
    assert torch.equal(routing.kept.sum(-1), torch.full((routing.kept.shape[0],), routing.top_k - 1))
    assert torch.equal(
        routing.weights.masked_fill(~routing.kept, -1).max(-1).values < routing.weights.max(-1).values,
        torch.ones(routing.kept.shape[0], dtype=torch.bool),
    )
    x = captured["x"]
    with torch.no_grad():
        outs = torch.stack([layer.experts.expert_forward(e, x) for e in range(layer.experts.num_experts)])  # [E, T, D]
    rows = torch.arange(x.shape[0])[:, None]
    expected = (outs[routing.indices, rows] * (routing.weights * routing.kept)[..., None]).sum(1)
    torch.testing.assert_close(captured["y"], expected, rtol=1e-5, atol=1e-7)


def test_a_rule_that_disagrees_with_the_gate_fails_loudly(tiny_paths):
    model = load_hf_model(str(tiny_paths["mixtral"]))
    for layer in model.moe_layers:
        layer.rule = SoftmaxTopK(top_k=layer.rule.top_k, normalize=False)  # Mixtral renormalizes
    with pytest.raises(RuntimeError, match="does not reproduce the gate"):
        model(_batch().tokens)


def test_a_transformers_4_linear_gate_is_recorded_and_knocked_out(tiny_paths):
    """transformers 4.x Mixtral: `gate` is an nn.Linear returning logits and the block routes. The
    adapter derives the block's decision from those logits and knocks out by masking them."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_paths["mixtral"]))
    decisions = []

    def legacy_forward(self, hidden_states):  # MixtralSparseMoeBlock.forward of transformers 4.46, eval mode
        b, s, d = hidden_states.shape
        h = hidden_states.view(-1, d)
        router_logits = self.gate(h)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        decisions.append((selected, weights))
        return self.experts(h, selected, weights.to(h.dtype)).reshape(b, s, d)

    for layer in hf.model.layers:
        linear = torch.nn.Linear(32, 4, bias=False)
        linear.weight = layer.mlp.gate.weight
        layer.mlp.gate = linear
        layer.mlp.forward = types.MethodType(legacy_forward, layer.mlp)
    model = HFMoEModel(hf).eval()
    tokens = _batch().tokens
    with torch.no_grad():
        routings = model(tokens).routings
        for r, (selected, weights) in zip(routings, decisions):
            assert torch.equal(_sorted(r.indices, r.weights)[0], _sorted(selected, weights)[0])
            torch.testing.assert_close(_sorted(r.indices, r.weights)[1], _sorted(selected, weights)[1])
        decisions.clear()
        layer = model.moe_layers[0]
        with expert_masked(layer, 1):
            masked = model(tokens).routings[0]
        assert not (decisions[0][0] == 1).any() and not (masked.indices == 1).any()
        with top1_dropped(layer), pytest.raises(NotImplementedError, match="only logits"):
            model(tokens)


# ----------------------------------------------------------------------------- errors and config
def test_missing_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"moe-specialization\[hf\]"):
        load_hf_model("any/name")


def test_unsupported_models_and_tokenizers_are_refused():
    with pytest.raises(ValueError, match="not a supported MoE family"):
        family_of(transformers.LlamaConfig())
    with pytest.raises(ValueError, match="reads only its own tokens"):
        hf_data_config(DataConfig(tokenizer="hf:gpt2"), "org/model")
    with pytest.raises(ValueError, match="synthetic"):
        hf_data_config(DataConfig(source="synthetic"), "org/model")
    assert hf_data_config(DataConfig(), "org/model").tokenizer == "hf:org/model"


def test_moe_analyze_hf_end_to_end(tiny_paths, tmp_path):
    """`moe-analyze model=hf:<local dir> data=local` on two tiny domains: the full report."""
    data = tmp_path / "domains"
    for domain, texts in DOMAINS.items():
        (data / domain).mkdir(parents=True)
        for i, text in enumerate(texts * 4):
            (data / domain / f"{i}.txt").write_text(f"{text} ({i})")
    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_CACHE_DIR": str(tmp_path / "cache")}
    # 128 tokens per domain: enough for the held-out I(D;E|C) to be measured (a context seen 16 times
    # in the training folds) also when counting one expert per token.
    args = [
        f"model=hf:{tiny_paths['deepseek_v3']}",
        "data=local",
        f"data.local.path={data}",
        f"out_dir={out}",
        "data.seq_len=16",
        "data.val_fraction=0.5",
        "data.val_tokens_per_domain=128",
        "batch_size=4",
        "analysis.n_permutations=10",
        "analysis.n_bootstrap=10",
        "analysis.knockout_tokens=32",
        "analysis.probe_tokens=64",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "analysis.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    m = summary["model"]
    assert m["family"] == "DeepSeek-V3" and m["blocks"] == [1, 2] and m["num_experts"] == 8 and m["top_k"] == 2
    assert "shared expert" in m["shared_experts"] and "sigmoid" in m["router"]
    assert summary["domains"] == ["code", "prose"]
    assert summary["tokens"]["per_domain"] == {"code": 128, "prose": 128}
    for layer in summary["layers"]:
        m = layer["measures"]
        assert m["nmi"]["plugin"] is not None and m["mi_token"]["value"] is not None
        assert m["cmi"]["bits"] is not None
        assert len(m["knockout"]["damage"]) == 2 and len(m["knockout"]["damage"][0]) == 8
        assert layer["coactivation"]["matrix"] and m["cka"]["matrix"]
        # Issue 22's measures on a Hugging Face model: committees, the router-input probe.
        assert m["committee_overlap"]["value"] is not None and len(m["committee_overlap"]["sizes"]) == 2
        assert m["probe_info"]["value"] is not None and m["probe_info"]["routing_use"] is not None
    assert set(summary["paths"]) == {"top1", "topk"}  # the expert paths through both MoE blocks
    assert all(p["value"] is not None and p["layers"] == [0, 1] for p in summary["paths"].values())
    assert (out / "routing.npz").exists() and (out / "data" / "manifest.json").exists()
    assert all((out / path).exists() for path in summary["files"]["figures"].values())
    assert str(tiny_paths["deepseek_v3"]) in (out / "report.md").read_text()
