"""Knockouts: the drop intervention against a per-token reference for every router kind, dense
groups against zeroed hidden activations, paired damage and its cluster-robust se against naive
computations, a selectivity whose null does not drift with the damage, the matched-damage
comparison, and a model restored after every intervention, also when the forward fails."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from analysis.knockout import (
    INTERVENTIONS,
    dense_group_knockouts,
    dense_groups,
    domain_losses,
    expert_dropped,
    expert_knockouts,
    expert_masked,
    hidden_units_zeroed,
    token_losses,
    top1_dropped,
    top1_knockouts,
)
from analysis.knockout_stats import (
    cluster_mean_se,
    cochran_q,
    corrected_cv,
    cv_lower_bound,
    heterogeneity,
    matched_comparison,
    selectivity,
    simulate_damage,
)
from analysis.recorder import interleave_domains, take_tokens
from moe.data.batch import Batch
from moe.experts import activate

ROUTERS = ("topk", "hash", "random", "expert_choice")


@pytest.fixture(scope="module")
def ko_batches(val_by_domain):
    return interleave_domains({d: take_tokens(b, 256) for d, b in val_by_domain.items()})


# ----------------------------------------------------------------------------- damage tables
def test_damage_tables_are_full_finite_and_paired(trained_moe, trained_dense, ko_batches):
    moe = expert_knockouts(trained_moe, ko_batches, 4)
    assert moe.damage.shape == moe.damage_se.shape == (2, 4, 4) and np.isfinite(moe.damage).all()
    assert (moe.damage_se > 0).all() and np.isfinite(moe.damage_se).all()
    assert moe.tokens.tolist() == [256] * 4 and (moe.clusters >= 2).all()
    assert moe.kind == "expert" and moe.intervention == INTERVENTIONS["expert"]
    assert moe.damage.mean() > 0  # removing an expert the router relies on costs loss on average
    base, _ = domain_losses(trained_moe, ko_batches, 4)
    np.testing.assert_allclose(base, moe.base_loss)
    assert all(not m.router._forward_hooks for m in trained_moe.moe_layers)

    # One unit against a naive paired computation: per-token difference, mean per domain.
    domain = np.concatenate([b.domain.reshape(-1).numpy() for b in ko_batches])
    intact = token_losses(trained_moe, ko_batches)
    with expert_dropped(trained_moe.moe_layers[1], 2):
        knocked = token_losses(trained_moe, ko_batches)
    naive = [(knocked - intact)[domain == d].mean() for d in range(4)]
    np.testing.assert_allclose(moe.damage[1, :, 2], naive, rtol=1e-9, atol=1e-12)

    dense = dense_group_knockouts(
        trained_dense, ko_batches, 4, blocks=moe.blocks, num_experts=4, size_factors=(0.5, 1.0, 2.0), replicates=2
    )
    f = trained_dense.blocks[0].ffn.w_out.shape[0]
    assert dense.damage.shape == dense.damage_se.shape == (2, 4, 6) and np.isfinite(dense.damage).all()
    assert dense.group_size.tolist() == [[f // 8] * 2 + [f // 4] * 2 + [f // 2] * 2] * 2
    assert [[g.size for g in layer] for layer in dense.groups] == dense.group_size.tolist()
    assert dense.kind == "dense_group" and np.isfinite(dense.damage_se).all()
    np.testing.assert_allclose(domain_losses(trained_dense, ko_batches, 4)[0], dense.base_loss)
    # Larger groups do more damage on average.
    assert dense.damage[:, :, 4:].mean() > dense.damage[:, :, :2].mean()

    top1 = top1_knockouts(trained_moe, ko_batches, 4)
    assert top1.damage.shape == top1.damage_se.shape == (2, 4)
    assert np.isfinite(top1.damage).all() and (top1.damage > 0).all()
    assert all(m.router.expert_mask.all() for m in trained_moe.moe_layers)


def test_cluster_choice_changes_only_the_standard_error(trained_moe, ko_batches):
    by_doc = top1_knockouts(trained_moe, ko_batches, 4, cluster="doc")
    by_row = top1_knockouts(trained_moe, ko_batches, 4, cluster="row")
    np.testing.assert_allclose(by_doc.damage, by_row.damage)
    assert by_row.clusters.tolist() == [8] * 4  # 256 tokens = 8 rows of 32 per domain
    assert not np.allclose(by_doc.damage_se, by_row.damage_se)
    with pytest.raises(ValueError, match="cluster"):
        top1_knockouts(trained_moe, ko_batches, 4, cluster="token")


def test_random_router_passes_are_paired_and_the_caller_rng_is_untouched(make_model, synthetic_data, ko_batches):
    model = make_model(synthetic_data.tokenizer.vocab_size, "random", n_layers=1).eval()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = token_losses(model, ko_batches[:2], seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(a, token_losses(model, ko_batches[:2], seed=5))  # same routing draws
    assert not np.array_equal(a, token_losses(model, ko_batches[:2], seed=6))
    first = expert_knockouts(model, ko_batches[:2], 4)
    np.testing.assert_array_equal(first.damage, expert_knockouts(model, ko_batches[:2], 4).damage)


@pytest.mark.parametrize("kind", ROUTERS)
def test_passes_from_the_knocked_block_equal_whole_forwards(kind, make_model, synthetic_data, ko_batches):
    """Knockouts re-run only the blocks from the intervention on, from the intact pass's hidden
    states and RNG states: every damage equals that of whole forward passes bit for bit (random
    routers included, whose draws continue from batch to batch), and the caller's RNG is untouched."""
    vocab = synthetic_data.tokenizer.vocab_size
    model = make_model(vocab, kind, n_layers=3).eval()
    dense = make_model(vocab, ffn="dense", n_layers=3).eval()
    batches = ko_batches[:3]
    domain = np.concatenate([b.domain.reshape(-1).numpy() for b in batches])
    cluster = np.concatenate([b.doc.reshape(-1).numpy() for b in batches])

    def whole(m):  # damage of the model as it is now, by whole forward passes
        diff = token_losses(m, batches, seed=0) - intact[id(m)]
        return cluster_mean_se(diff, domain, cluster, 4)

    intact = {id(m): token_losses(m, batches, seed=0) for m in (model, dense)}
    torch.manual_seed(7)
    state = torch.get_rng_state()
    experts = expert_knockouts(model, batches, 4)
    top1 = top1_knockouts(model, batches, 4)
    groups = dense_group_knockouts(dense, batches, 4, blocks=[0, 1, 2], num_experts=4, replicates=1)
    assert torch.equal(torch.get_rng_state(), state)
    for l, layer in enumerate(model.moe_layers):
        for e in range(4):
            with expert_dropped(layer, e):
                ref = whole(model)
            np.testing.assert_array_equal(experts.damage[l, :, e], ref.mean)
            np.testing.assert_array_equal(experts.damage_se[l, :, e], ref.se)
        with top1_dropped(layer):
            np.testing.assert_array_equal(top1.damage[l], whole(model).mean)
        for g, units in enumerate(groups.groups[l]):
            with hidden_units_zeroed(dense.blocks[l].ffn, units):
                np.testing.assert_array_equal(groups.damage[l, :, g], whole(dense).mean)


# ----------------------------------------------------------------------------- the drop intervention
def _layer_io(model, batch, layer=0, seed=0):
    """Input [T, D], output [T, D] and routing of one MoE layer (torch seeded: random routers repeat)."""
    out = {}
    moe = model.moe_layers[layer]
    h_in = moe.register_forward_pre_hook(lambda m, a: out.__setitem__("x", a[0]))
    h_out = moe.register_forward_hook(lambda m, a, o: out.__setitem__("y", o[0]))
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            routing = model(batch.tokens).routings[layer]
    finally:
        h_in.remove()
        h_out.remove()
    d = out["y"].shape[-1]
    return out["x"].reshape(-1, d), out["y"].reshape(-1, d), routing


def _naive_layer(layer, x, routing, drop=()):
    """Reference MoE output, token by token: sum over kept slots whose expert is not in `drop` of
    gate * expert(x_t), plus the shared experts."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(routing.top_k):
            e = int(routing.indices[t, j])
            if routing.kept[t, j] and e not in drop:
                y[t] += routing.weights[t, j] * layer.experts.expert_forward(e, x[t : t + 1])[0]
    if layer.shared is not None:
        y = y + layer.shared(x)
    return y


@pytest.mark.parametrize("kind", ROUTERS)
def test_dropping_an_expert_removes_exactly_its_contribution(kind, make_model, synthetic_data, ko_batches):
    """For every router kind: the layer output with expert e dropped equals the output recomputed
    token by token from the intact routing without e's assignments (no re-routing, no
    renormalization); tokens that did not use e are unchanged."""
    model = make_model(synthetic_data.tokenizer.vocab_size, kind, n_layers=1).eval()
    batch = Batch(
        *(t[:2] for t in (ko_batches[0].tokens, ko_batches[0].targets, ko_batches[0].domain, ko_batches[0].doc))
    )
    x, intact, routing = _layer_io(model, batch)
    layer = model.moe_layers[0]
    with torch.no_grad():
        torch.testing.assert_close(intact, _naive_layer(layer, x, routing), rtol=1e-5, atol=1e-6)
        for e in range(layer.router.num_experts):
            with expert_dropped(layer, e):
                x_ko, knocked, routing_ko = _layer_io(model, batch)
            torch.testing.assert_close(x_ko, x)
            assert torch.equal(routing_ko.indices, routing.indices)  # nothing re-routed
            assert torch.equal(routing_ko.weights, routing.weights)  # gates not renormalized
            assert torch.equal(routing_ko.kept, routing.kept & (routing.indices != e))
            torch.testing.assert_close(knocked, _naive_layer(layer, x, routing, drop=(e,)), rtol=1e-5, atol=1e-6)
            used = ((routing.indices == e) & routing.kept).any(dim=1)
            torch.testing.assert_close(knocked[~used], intact[~used], rtol=0, atol=1e-6)
            if used.any():
                assert ((knocked[used] - intact[used]).abs().amax(dim=1) > 1e-7).all()
    assert not layer.router._forward_hooks


def test_expert_dropped_takes_several_experts(trained_moe, ko_batches):
    layer = trained_moe.moe_layers[0]
    _, _, intact = _layer_io(trained_moe, ko_batches[0])
    with expert_dropped(layer, [1, 2]):
        _, _, routing = _layer_io(trained_moe, ko_batches[0])
    assert torch.equal(routing.kept, ~torch.isin(intact.indices, torch.tensor([1, 2])))
    assert not layer.router._forward_hooks


def test_legacy_mask_reroutes_a_learned_router(trained_moe, ko_batches):
    """`expert_masked` (kept for old callers) re-routes: the difference from `expert_dropped`."""
    layer = trained_moe.moe_layers[0]
    with expert_masked(layer, [1, 2]):
        _, _, routing = _layer_io(trained_moe, ko_batches[0])
        assert not layer.router.expert_mask[[1, 2]].any()
    assert not torch.isin(routing.indices, torch.tensor([1, 2])).any() and routing.kept.all()
    assert layer.router.expert_mask.all()


def test_top1_dropped_removes_one_kept_slot_per_token(trained_moe, ko_batches):
    layer = trained_moe.moe_layers[0]
    _, _, intact = _layer_io(trained_moe, ko_batches[0])
    with top1_dropped(layer):
        _, _, dropped = _layer_io(trained_moe, ko_batches[0])
    assert torch.equal(dropped.indices, intact.indices)  # same choices, only the top-1 slot dropped
    assert (dropped.kept.sum(dim=1) == 1).all()
    top1 = intact.weights.argmax(dim=1)
    assert not dropped.kept[torch.arange(top1.numel()), top1].any()
    assert not layer.router._forward_hooks


# ----------------------------------------------------------------------------- dense groups
def test_hidden_units_zeroed_equals_zeroing_the_hidden_activations(trained_dense):
    mlp = trained_dense.blocks[0].ffn
    x = torch.randn(10, mlp.w_in.shape[0])
    units = dense_groups(mlp.w_out.shape[0], 4, size_factors=(1.0,), replicates=1, rng=3)[0]
    with torch.no_grad():
        intact = mlp(x)
        for index in (units, slice(8, 24)):
            h = activate(x @ mlp.w_in, mlp.activation)
            h[:, index] = 0
            ref = h @ mlp.w_out
            with hidden_units_zeroed(mlp, index):
                got = mlp(x)
            torch.testing.assert_close(got, ref)
            torch.testing.assert_close(mlp(x), intact, rtol=0, atol=0)  # restored


def test_dense_groups_are_seeded_random_groups_of_the_asked_sizes():
    groups = dense_groups(128, 8, size_factors=(0.5, 1.0, 2.0, 100.0), replicates=3, rng=0)
    assert [g.size for g in groups] == [8] * 3 + [16] * 3 + [32] * 3 + [128] * 3
    for g in groups:
        assert g.dtype == np.int64 and (np.diff(g) > 0).all() and g.min() >= 0 and g.max() < 128
    assert not np.array_equal(groups[3], groups[4])  # replicates differ
    assert not np.array_equal(groups[3], np.arange(16))  # not a contiguous block
    again = dense_groups(128, 8, size_factors=(0.5, 1.0, 2.0, 100.0), replicates=3, rng=0)
    assert all(np.array_equal(a, b) for a, b in zip(groups, again))
    assert dense_groups(3, 8, size_factors=(0.1,), replicates=1)[0].size == 1
    with pytest.raises(ValueError):
        dense_groups(16, 4, size_factors=(0.0,))


def test_dense_groups_of_a_layer_do_not_depend_on_the_other_layers(trained_dense, ko_batches):
    both = dense_group_knockouts(
        trained_dense, ko_batches[:2], 4, blocks=[0, 1], num_experts=4, size_factors=(1.0,), replicates=2, seed=7
    )
    one = dense_group_knockouts(
        trained_dense, ko_batches[:2], 4, blocks=[1], num_experts=4, size_factors=(1.0,), replicates=2, seed=7
    )
    assert all(np.array_equal(a, b) for a, b in zip(both.groups[1], one.groups[0]))
    np.testing.assert_allclose(both.damage[1], one.damage[0])


# ----------------------------------------------------------------------------- restoring the model
def _bad_batch(batch: Batch, vocab: int) -> Batch:
    tokens = batch.tokens.clone()
    tokens[0, 0] = vocab + 5  # out of the embedding's range: the forward raises
    return Batch(tokens, batch.targets, batch.domain, batch.doc)


def test_interventions_are_undone_when_the_forward_raises(trained_moe, trained_dense, ko_batches):
    bad = [_bad_batch(ko_batches[0], trained_moe.vocab_size)]
    for run in (expert_knockouts, top1_knockouts):
        with pytest.raises(IndexError):
            run(trained_moe, bad, 4)
        assert all(not m.router._forward_hooks for m in trained_moe.moe_layers)
    # The intact pass succeeds and a knocked-out pass fails: the hook must still come off.
    layer = trained_moe.moe_layers[0]
    with pytest.raises(RuntimeError, match="boom"):
        with expert_dropped(layer, 1):
            raise RuntimeError("boom")
    assert not layer.router._forward_hooks
    before = [b.ffn.w_out.detach().clone() for b in trained_dense.blocks]
    with pytest.raises(IndexError):
        dense_group_knockouts(trained_dense, bad, 4, blocks=[0, 1], num_experts=4, replicates=1)
    mlp = trained_dense.blocks[0].ffn
    with pytest.raises(RuntimeError, match="boom"):
        with hidden_units_zeroed(mlp, np.array([0, 5, 9])):
            raise RuntimeError("boom")
    for b, w in zip(trained_dense.blocks, before):
        assert torch.equal(b.ffn.w_out, w)
    assert not trained_moe.training and not trained_dense.training
    with pytest.raises(RuntimeError, match="boom"):
        with expert_masked(trained_moe.moe_layers[1], 3):
            raise RuntimeError("boom")
    assert trained_moe.moe_layers[1].router.expert_mask.all()


# ----------------------------------------------------------------------------- damage and its se
def _naive_cluster_se(values, domain, cluster, d):
    """Per-domain mean and CR1 se, with explicit loops over clusters."""
    sel = domain == d
    v, c = values[sel], cluster[sel]
    n, mean = v.size, v.mean()
    ids = sorted(set(c.tolist()))
    s = sum((v[c == g] - mean).sum() ** 2 for g in ids)
    return mean, np.sqrt(len(ids) / (len(ids) - 1) * s / n**2)


def test_cluster_mean_se_against_a_naive_loop():
    rng = np.random.default_rng(0)
    n = 600
    domain = rng.integers(0, 3, n)
    cluster = rng.integers(0, 25, n)  # cluster ids reused across domains: keyed by (domain, cluster)
    values = rng.normal(size=(2, 5, n)) + rng.normal(size=25)[cluster]
    res = cluster_mean_se(values, domain, cluster, 4)
    assert res.mean.shape == res.se.shape == (2, 5, 4)
    for d in range(3):
        for i in range(2):
            for j in range(5):
                mean, se = _naive_cluster_se(values[i, j], domain, cluster, d)
                assert res.mean[i, j, d] == pytest.approx(mean, rel=1e-12)
                assert res.se[i, j, d] == pytest.approx(se, rel=1e-10)
        assert res.tokens[d] == (domain == d).sum()
        assert res.clusters[d] == len(set(cluster[domain == d].tolist()))
    assert np.isnan(res.mean[..., 3]).all() and res.tokens[3] == 0  # a domain without tokens
    # One token per cluster: the ordinary s / sqrt(n) with ddof = 1.
    one = cluster_mean_se(values[0, 0], domain, np.arange(n), 4)
    for d in range(3):
        x = values[0, 0][domain == d]
        assert one.se[d] == pytest.approx(x.std(ddof=1) / np.sqrt(x.size), rel=1e-10)
    single = cluster_mean_se(np.ones(4), np.zeros(4, int), np.zeros(4, int), 1)
    assert np.isnan(single.se).all()  # one cluster: no se


def test_cluster_se_matches_the_spread_of_simulated_documents():
    """Tokens of one document share an effect: the document-robust se matches the true sd of the
    domain mean (and the per-token formula would be 3x too small)."""
    sim = simulate_damage(200, 0.01, doc_len=64, doc_sd=0.1, rng=2)
    truth = np.sqrt(0.3**2 / 4096 + 0.1**2 / 64)
    assert sim.damage_se.mean() == pytest.approx(truth, rel=0.05)
    assert sim.damage.std(axis=1, ddof=1).mean() == pytest.approx(truth, rel=0.1)
    assert sim.clusters.tolist() == [64] * 4 and sim.tokens.tolist() == [4096] * 4
    _, p = cochran_q(sim.damage, sim.damage_se)
    assert 0.01 < np.mean(p < 0.05) < 0.11


# ----------------------------------------------------------------------------- selectivity
DAMAGES = (0.05, 0.01, 0.003)


@pytest.fixture(scope="module")
def simulated():
    """200 units per (profile, mean damage): 4 domains x 4,096 tokens, per-token sd 0.3 nats."""
    return {
        (profile, m): simulate_damage(200, m, profile=profile, rng=i)
        for i, (profile, m) in enumerate((p, m) for p in ("equal", "single") for m in DAMAGES)
    }


def test_old_selectivity_drifts_with_the_damage_and_the_corrected_cv_does_not(simulated):
    old = [np.nanmedian(selectivity(simulated["equal", m].damage)) for m in DAMAGES]
    assert old[0] < 0.06 and old[1] > 0.1 and old[2] > 0.2  # the audit's drift
    for m in DAMAGES:
        sim = simulated["equal", m]
        cv = corrected_cv(sim.damage, sim.damage_se)
        assert np.nanmedian(cv) < 0.01  # 0: most equal-damage units sit below the noise
        lower = cv_lower_bound(sim.damage, sim.damage_se)
        assert np.nanquantile(lower, 0.9) == 0.0 and 0.01 <= np.mean(lower > 0) <= 0.12
        # Zero in expectation: the noise-corrected variance excess averages 0.
        excess = sim.damage.var(axis=0, ddof=1) - (sim.damage_se**2).mean(axis=0)
        assert abs(excess.mean()) < 3 * excess.std() / np.sqrt(excess.size)
        _, p = cochran_q(sim.damage, sim.damage_se)
        assert 0.01 < np.mean(p < 0.05) < 0.11  # calibrated at every damage size


def test_single_domain_units_score_near_the_maximum(simulated):
    sim = simulated["single", 0.05]
    np.testing.assert_allclose(sim.true_damage[:, 0], [0.2, 0, 0, 0])
    assert np.median(corrected_cv(sim.damage, sim.damage_se)) == pytest.approx(1.0, abs=0.05)
    assert np.median(cv_lower_bound(sim.damage, sim.damage_se)) > 0.85
    h = heterogeneity(sim.damage, sim.damage_se)
    assert (h.p_value < 1e-6).all() and np.median(h.i2) > 0.95
    np.testing.assert_allclose(h.mean_damage, sim.damage.mean(axis=0))
    # Exact values on noiseless tables: 1 for one domain, 0 for all alike, in between otherwise.
    damage = np.array([[0.4, 0.1, 0.2], [0.0, 0.1, 0.2], [0.0, 0.1, 0.0], [0.0, 0.1, 0.0]])
    cv = corrected_cv(damage, np.zeros_like(damage))
    assert cv[0] == pytest.approx(1.0) and cv[1] == pytest.approx(0.0) and 0 < cv[2] < 1
    assert np.isnan(corrected_cv(-damage, np.zeros_like(damage))).all()  # no damage: undefined
    assert np.isnan(corrected_cv(np.ones((1, 3)), np.zeros((1, 3)))).all()  # one domain


def test_matched_comparison_by_hand():
    # One layer, D = 2; experts' mean damages 0.1, 0.4, 0 (none); dense groups at 0.04, 0.1, 0.15, 0.3.
    se = 1e-3
    experts = np.array([[[0.2, 0.8, 0.0], [0.0, 0.0, 0.0]]])
    dense = np.array([[[0.04, 0.1, 0.16, 0.3], [0.04, 0.1, 0.14, 0.3]]])
    res = matched_comparison(
        experts, np.full_like(experts, se), dense, np.full_like(dense, se), factor=2.0, statistic="cv"
    )
    np.testing.assert_allclose(res.mean_damage, [[0.1, 0.4, 0.0]])
    assert res.matched[0].tolist() == [
        [False, True, True, False],
        [False, False, False, True],
        [False, False, False, False],
    ]
    assert res.n_matched.tolist() == [[2, 1, 0]]
    # Experts hurt one domain of two, the dense groups nearly none: every expert outranks them.
    assert res.percentile[0, :2].tolist() == [1.0, 1.0]
    np.testing.assert_allclose(res.p_value[0, :2], [1 / 3, 1 / 2])
    np.testing.assert_allclose(res.matched_damage_median[0, :2], [0.125, 0.3])
    assert np.isnan(res.p_value[0, 2]) and np.isnan(res.percentile[0, 2])
    with pytest.raises(ValueError):
        matched_comparison(experts, experts, dense, dense, statistic="max")
    with pytest.raises(ValueError):
        matched_comparison(experts, experts, dense[:, :1], dense[:, :1])


def test_matched_comparison_is_calibrated_for_noisier_experts():
    """Equal-damage experts twice as noisy as the dense groups are not called more selective more
    often than the nominal level; single-domain experts are."""
    rng = np.random.default_rng(0)
    dense = [simulate_damage(12, m, rng=rng) for m in (0.025, 0.05, 0.1)]
    dd = np.concatenate([s.damage for s in dense], axis=1)[None]
    dse = np.concatenate([s.damage_se for s in dense], axis=1)[None]
    null = simulate_damage(200, 0.05, token_sd=0.6, rng=rng)
    res = matched_comparison(null.damage[None], null.damage_se[None], dd, dse)
    assert res.statistic == "cv_lower" and (res.n_matched >= 20).all()
    assert np.mean(res.p_value < 0.05) < 0.1
    spec = simulate_damage(50, 0.05, token_sd=0.6, profile="single", rng=rng)
    res = matched_comparison(spec.damage[None], spec.damage_se[None], dd, dse)
    assert np.mean(res.p_value < 0.05) > 0.9 and np.median(res.percentile) == 1.0


def test_simulate_damage_profiles():
    sim = simulate_damage(3, 0.02, num_domains=3, profile=[1.0, 2.0, 3.0], rng=0, tokens_per_domain=100)
    np.testing.assert_allclose(sim.true_damage[:, 0], [0.01, 0.02, 0.03])
    assert sim.damage.shape == sim.damage_se.shape == (3, 3)
    assert simulate_damage(2, 0.01, profile="single", target=2, rng=0).true_damage[2, 0] == pytest.approx(0.04)
    with pytest.raises(ValueError):
        simulate_damage(2, 0.01, profile="half")


def test_selectivity_legacy_on_hand_made_damage():
    damage = np.array([[0.4, 0.1, 0.0], [0.0, 0.1, 0.0], [0.0, 0.1, 0.0], [0.0, 0.1, 0.0]])
    sel = selectivity(damage)
    assert sel[0] == pytest.approx(1.0) and sel[1] == pytest.approx(0.0) and np.isnan(sel[2])


def test_statistics_import_neither_torch_nor_the_model():
    # moe.validation (the shared torch-free error wording) is the one moe module allowed.
    code = (
        "import sys, analysis.knockout_stats; "
        "model = sorted(m for m in sys.modules if m.startswith('moe.') and m != 'moe.validation'); "
        "assert 'torch' not in sys.modules and not model, model"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
