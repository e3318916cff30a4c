"""The routing recorder against independent references: the model's own returned routings, the
metric helpers on the raw records, and planted routings with known information content."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import analysis.counts as counts_mod
from analysis.counts import KeyCounter
from analysis.information import conditional_mutual_information, contingency
from analysis.measures import coactivation_from_pairs, domain_shares, measure_layer
from analysis.metrics import (
    coactivation,
    consecutive_expert_null,
    consecutive_expert_rate,
    domain_specialization,
    mean_router_entropy,
)
from analysis.recorder import (
    RoutingRecorder,
    interleave_domains,
    record_routing,
    take_tokens,
)
from analysis.records import RoutingRecords
from moe.routing import Routing


@pytest.fixture(scope="module")
def mixed_batches(val_by_domain):
    return interleave_domains(val_by_domain)


@pytest.fixture(scope="module")
def recording(trained_moe, mixed_batches, synthetic_data):
    return record_routing(
        trained_moe, mixed_batches, num_domains=len(synthetic_data.domains), domains=synthetic_data.domains
    )


def naive_counts(model, batches, num_domains):
    """Reference tables from `LMOutput.routings`, built with explicit loops over kept slots."""
    V = model.vocab_size
    out = []
    with torch.no_grad():
        routed = [(b, model(b.tokens).routings) for b in batches]
    for layer in range(len(model.moe_layers)):
        E = routed[0][1][layer].num_experts
        ref = {
            "domain_expert": np.zeros((num_domains, E)),
            "cube": np.zeros((V, num_domains, E)),
            "doc": {},
            "pairs": np.zeros((E, E)),
            "top1": np.zeros(E),
            "probs": [],
        }
        for batch, routings in routed:
            r = routings[layer]
            tok, dom, doc = (
                batch.tokens.reshape(-1).numpy(),
                batch.domain.reshape(-1).numpy(),
                batch.doc.reshape(-1).numpy(),
            )
            idx, kept, w = r.indices.numpy(), r.kept.numpy(), r.weights.numpy()
            for t in range(idx.shape[0]):
                chosen = [int(idx[t, j]) for j in range(idx.shape[1]) if kept[t, j]]
                for e in chosen:
                    ref["domain_expert"][dom[t], e] += 1
                    ref["cube"][tok[t], dom[t], e] += 1
                    ref["doc"][(int(doc[t]), e)] = ref["doc"].get((int(doc[t]), e), 0) + 1
                    for f in chosen:
                        ref["pairs"][e, f] += 1
                if chosen:
                    best = max((j for j in range(idx.shape[1]) if kept[t, j]), key=lambda j: w[t, j])
                    ref["top1"][idx[t, best]] += 1
            ref["probs"].append(r.probs.numpy())
        out.append(ref)
    return out


def test_recorder_leaves_outputs_unchanged(trained_moe, mixed_batches, synthetic_data):
    batch = mixed_batches[0]
    with torch.no_grad():
        plain = trained_moe(batch.tokens, batch.targets)
        with RoutingRecorder(trained_moe, len(synthetic_data.domains)) as rec:
            rec.observe(batch)
            hooked = trained_moe(batch.tokens, batch.targets)
    assert torch.equal(plain.logits, hooked.logits)
    assert torch.equal(plain.token_loss, hooked.token_loss)
    for a, b in zip(plain.routings, hooked.routings):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert all(len(layer.router._forward_hooks) == 0 for layer in trained_moe.moe_layers)


def test_counts_equal_naive_recount_of_returned_routings(trained_moe, mixed_batches, recording, synthetic_data):
    D = len(synthetic_data.domains)
    refs = naive_counts(trained_moe, mixed_batches, D)
    assert len(recording.layers) == len(refs) == 2
    for counts, ref in zip(recording.layers, refs):
        np.testing.assert_array_equal(counts.domain_expert, ref["domain_expert"])
        cube = np.zeros(ref["cube"].shape)
        cube[counts.cube.token, counts.cube.domain, counts.cube.expert] = counts.cube.count
        np.testing.assert_array_equal(cube, ref["cube"])
        np.testing.assert_array_equal(counts.token_expert(), ref["cube"].sum(axis=1))
        docs = {
            (int(counts.docs.doc_ids[m]), e): counts.docs.counts[m, e]
            for m in range(counts.docs.doc_ids.size)
            for e in range(counts.num_experts)
            if counts.docs.counts[m, e]
        }
        assert docs == ref["doc"]
        np.testing.assert_array_equal(counts.pairs, ref["pairs"])
        np.testing.assert_array_equal(counts.top1, ref["top1"])
        assert counts.tokens == sum(b.num_tokens for b in mixed_batches)
        assert counts.assignments == counts.slots == 2 * counts.tokens  # top-2, dropless
        probs = np.concatenate(ref["probs"])
        assert counts.entropy_bits_sum / counts.tokens == pytest.approx(mean_router_entropy(probs), rel=1e-5)
        assert counts.batch_loads.shape == (len(mixed_batches), counts.num_experts)
        np.testing.assert_array_equal(counts.batch_loads.sum(axis=0), counts.load)
    # The per-domain loss is the model's own token loss averaged by domain.
    with torch.no_grad():
        losses = [(trained_moe(b.tokens, b.targets).token_loss, b.domain) for b in mixed_batches]
    for d in range(D):
        mean = torch.cat([l[dom == d] for l, dom in losses]).double().mean().item()
        assert recording.domain_loss[d] == pytest.approx(mean, rel=1e-9)


def test_metrics_on_records_agree_with_streamed_counts(recording):
    rec = recording.records
    for i, counts in enumerate(recording.layers):
        layer = rec.layers[i]
        experts = layer.experts.astype(np.int64)
        assert layer.kept.all()
        np.testing.assert_allclose(coactivation_from_pairs(counts.pairs), coactivation(experts, counts.num_experts))
        rate = consecutive_expert_rate(experts, rec.doc, gates=layer.gates, positions=rec.position)
        assert counts.consecutive_same / counts.consecutive_pairs == pytest.approx(rate)
        top1 = counts.top1 / counts.top1.sum()
        assert float(top1 @ top1) == pytest.approx(consecutive_expert_null(experts, gates=layer.gates))
        joint = contingency(rec.domain, experts, counts.num_domains, counts.num_experts)
        np.testing.assert_array_equal(joint, counts.domain_expert)
        np.testing.assert_allclose(
            domain_shares(counts.domain_expert, counts.tokens_per_domain), domain_specialization(joint, counts.top_k)
        )


def test_records_round_trip_npz(recording, tmp_path, synthetic_data):
    path = recording.records.save(tmp_path / "routing.npz")
    back = RoutingRecords.load(path)
    assert back.domains == synthetic_data.domains
    assert (back.num_experts, back.top_k) == (recording.records.num_experts, recording.records.top_k)
    for name in ("token", "domain", "doc", "position"):
        np.testing.assert_array_equal(getattr(back, name), getattr(recording.records, name))
    for a, b in zip(back.layers, recording.records.layers):
        for name in ("experts", "gates", "kept"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
            assert getattr(a, name).dtype == getattr(b, name).dtype


def test_expert_choice_counts_only_kept_slots(make_model, synthetic_data, mixed_batches):
    model = make_model(synthetic_data.tokenizer.vocab_size, "expert_choice", n_layers=1).eval()
    rec = record_routing(model, mixed_batches[:4], num_domains=4)
    counts = rec.layers[0]
    assert counts.slots == counts.tokens * counts.num_experts  # K = E slots
    with torch.no_grad():
        kept = sum(int(model(b.tokens).routings[0].kept.sum()) for b in mixed_batches[:4])
    assert counts.assignments == kept == counts.domain_expert.sum() < counts.slots
    assert counts.cube.count.sum() == kept


def test_gate_weighted_tables(trained_moe, mixed_batches):
    rec = record_routing(trained_moe, mixed_batches[:3], num_domains=4, gate_weighted=True)
    counts, raw = rec.layers[0], rec.records.layers[0]
    assert counts.weighting == "gate"
    assert counts.cube.count.sum() == pytest.approx(float(raw.gates.astype(np.float64).sum()))
    assert counts.docs.counts.sum() == pytest.approx(float(raw.gates.astype(np.float64).sum()))
    assert counts.cube_counts.count.sum() == raw.experts.size  # unweighted twin of the cube


def test_recorder_refuses_forward_without_context(trained_moe, mixed_batches):
    batch = mixed_batches[0]
    with torch.no_grad(), RoutingRecorder(trained_moe, 4) as rec:
        with pytest.raises(RuntimeError, match="observe"):
            trained_moe(batch.tokens)
        rec.observe(batch)
        trained_moe(batch.tokens)
        with pytest.raises(RuntimeError, match="fresh"):
            trained_moe(batch.tokens)  # a second forward would count the batch twice
    assert all(len(layer.router._forward_hooks) == 0 for layer in trained_moe.moe_layers)


def test_recorder_used_directly_has_no_losses(trained_moe, mixed_batches):
    """The context-manager path sees the routing only: its losses are absent (None), and asking for
    the per-domain loss says so, instead of a loss of 0 over 0 tokens (an all-nan domain_loss)."""
    with torch.no_grad(), RoutingRecorder(trained_moe, 4) as rec:
        for batch in mixed_batches[:2]:
            rec.observe(batch)
            trained_moe(batch.tokens)
    recording = rec.result()
    assert recording.loss_sum is None and recording.loss_tokens is None
    with pytest.raises(ValueError, match="no losses.*record_routing"):
        _ = recording.domain_loss
    assert recording.layers[0].tokens == sum(b.num_tokens for b in mixed_batches[:2])


def test_record_routing_restores_train_mode(trained_moe, mixed_batches):
    was_training = trained_moe.training
    trained_moe.train()
    try:
        rec = record_routing(trained_moe, mixed_batches[:1], num_domains=4, keep_records=False)
        assert trained_moe.training and rec.loss_sum is not None
    finally:
        trained_moe.train(was_training)


def test_dense_model_is_refused(trained_dense):
    with pytest.raises(ValueError, match="no MoE layer"):
        RoutingRecorder(trained_dense, 4)


@pytest.mark.parametrize("size", [50, None])
def test_key_counter_dense_and_sparse_agree(size, monkeypatch):
    monkeypatch.setattr(counts_mod, "_SPARSE_FLUSH", 7)  # force several merges
    rng = np.random.default_rng(0)
    counter = KeyCounter(size)
    ref = np.zeros(50)
    for _ in range(10):
        keys = rng.integers(0, 50, size=rng.integers(1, 20))
        w = rng.random(keys.size)
        counter.add(keys, w)
        np.add.at(ref, keys, w)
    keys, sums = counter.items()
    np.testing.assert_array_equal(keys, np.flatnonzero(ref))
    np.testing.assert_allclose(sums, ref[keys])


def test_stream_helpers(val_by_domain):
    mixed = interleave_domains(val_by_domain)
    rows = sorted(tuple(r.tolist()) for b in mixed for r in b.tokens)
    orig = sorted(tuple(r.tolist()) for batches in val_by_domain.values() for b in batches for r in b.tokens)
    assert rows == orig
    assert len(set(mixed[0].domain[:, 0].tolist())) == len(val_by_domain)  # each batch mixes domains
    cut = take_tokens(next(iter(val_by_domain.values())), 100)
    assert sum(b.num_tokens for b in cut) == 128  # whole rows of 32 up to >= 100 tokens


# ----------------------------------------------------------------------------- planted routings
def test_hash_router_on_disjoint_domains_has_domain_info_only_through_tokens(make_model, disjoint_data):
    """overlap = 0: a hash router (a function of the token id) shows domain information, but no
    domain information beyond the token (held-out I(D;E|T) ~ 0, not significant)."""
    model = make_model(disjoint_data.tokenizer.vocab_size, "hash", n_layers=1, top_k=1).eval()
    batches = interleave_domains({d: disjoint_data.val_batches(batch_size=8, domain=d) for d in disjoint_data.domains})
    rec = record_routing(model, batches, num_domains=4)
    m = measure_layer(rec.layers[0], rec.records, 0, n_permutations=99, n_bootstrap=99, rng=0)
    nmi, cmi = m["measures"]["nmi"], m["measures"]["cmi"]
    assert m["measures"]["mi_domain"]["value"] > 0.1
    assert nmi["ci_low"] > 0 and nmi["p_value"] <= 0.01
    assert cmi["plugin_token_bits"] == pytest.approx(0.0, abs=1e-12)
    assert abs(cmi["bits"]) < 1e-3 and cmi["ci_high"] < 0.02  # smoothing crumbs only: shown negligible
    # Only EOS is shared by the domains, so H(D|T) is small but the token explains the routing.
    assert m["measures"]["mi_token"]["value"] > m["measures"]["mi_domain"]["value"]


def test_routing_forced_to_the_domain_gives_nmi_one(make_model, synthetic_data, mixed_batches):
    model = make_model(synthetic_data.tokenizer.vocab_size, "topk", n_layers=1, num_experts=4, top_k=1).eval()
    current = {}

    def force(module, args, routing: Routing) -> Routing:
        idx = current["domain"].reshape(-1, 1)
        return Routing(
            idx,
            torch.ones_like(idx, dtype=torch.float32),
            routing.logits,
            routing.probs,
            torch.ones_like(idx, dtype=torch.bool),
        )

    handle = model.moe_layers[0].router.register_forward_hook(force)
    try:
        with torch.no_grad(), RoutingRecorder(model, 4) as rec:
            for batch in mixed_batches:
                current["domain"] = batch.domain
                rec.observe(batch)
                model(batch.tokens)
    finally:
        handle.remove()
    result = rec.result()
    m = measure_layer(result.layers[0], result.records, 0, n_permutations=49, n_bootstrap=49, rng=0)
    assert m["measures"]["nmi"]["plugin"] == 1.0
    assert m["measures"]["mi_domain"]["value"] == pytest.approx(math.log2(4))
    assert np.allclose(np.diag(np.array(m["domain_specialization"])), 1.0)
    # Routing = domain: given the token, the expert still tells the domain apart.
    cmi = m["measures"]["cmi"]
    assert cmi["plugin_token_bits"] == pytest.approx(conditional_mutual_information(result.layers[0].cube))
    assert cmi["p_value"] < 0.05 and cmi["bits"] > 0
