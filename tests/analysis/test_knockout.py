"""Knockouts: full finite damage matrices, exact effects on the tokens that used the expert, and a
model restored after every intervention, also when the forward fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.knockout import (
    dense_slice_knockouts,
    domain_losses,
    expert_knockouts,
    expert_masked,
    hidden_slice_zeroed,
    hidden_slices,
    selectivity,
    top1_dropped,
    top1_knockouts,
)
from analysis.recorder import interleave_domains, take_tokens
from moe.data.batch import Batch
from moe.experts import activate


@pytest.fixture(scope="module")
def ko_batches(val_by_domain):
    return interleave_domains({d: take_tokens(b, 256) for d, b in val_by_domain.items()})


def test_damage_matrices_are_full_and_finite(trained_moe, trained_dense, ko_batches):
    moe = expert_knockouts(trained_moe, ko_batches, 4)
    assert moe.damage.shape == (2, 4, 4) and np.isfinite(moe.damage).all()
    assert np.isfinite(moe.base_loss).all() and moe.tokens.tolist() == [256] * 4
    # Removing an expert the router relies on costs loss on average.
    assert moe.damage.mean() > 0
    base, _ = domain_losses(trained_moe, ko_batches, 4)
    np.testing.assert_allclose(base, moe.base_loss)  # the model is back to its intact state

    dense = dense_slice_knockouts(trained_dense, ko_batches, 4, blocks=moe.blocks, num_slices=4)
    assert dense.damage.shape == (2, 4, 4) and np.isfinite(dense.damage).all()
    np.testing.assert_allclose(domain_losses(trained_dense, ko_batches, 4)[0], dense.base_loss)

    top1 = top1_knockouts(trained_moe, ko_batches, 4)
    assert top1.damage.shape == (2, 4) and np.isfinite(top1.damage).all() and (top1.damage > 0).all()
    assert all(m.router.expert_mask.all() for m in trained_moe.moe_layers)


def _layer_output(model, batch, layer=0):
    out = {}
    handle = model.moe_layers[layer].register_forward_hook(lambda m, a, o: out.__setitem__("y", o[0]))
    try:
        with torch.no_grad():
            routing = model(batch.tokens).routings[layer]
    finally:
        handle.remove()
    return out["y"].reshape(-1, out["y"].shape[-1]), routing


def test_hash_knockout_changes_exactly_the_tokens_routed_to_the_expert(make_model, synthetic_data, ko_batches):
    """Hash routing drops a masked expert's assignments: the MoE layer's output changes for the
    tokens routed to it and for no other token (checked on the layer output: attention of later
    layers would mix tokens)."""
    model = make_model(synthetic_data.tokenizer.vocab_size, "hash", n_layers=1).eval()
    batch = ko_batches[0]
    intact, routing = _layer_output(model, batch)
    for e in range(4):
        with expert_masked(model.moe_layers[0], e):
            knocked, routing_ko = _layer_output(model, batch)
        used = (routing.indices == e).any(dim=1)
        assert used.any() and (~used).any()
        assert torch.equal(routing_ko.kept, routing.indices != e)
        torch.testing.assert_close(knocked[~used], intact[~used], rtol=0, atol=1e-6)
        assert ((knocked[used] - intact[used]).abs().amax(dim=1) > 1e-6).all()


def test_learned_router_reroutes_around_a_masked_expert(trained_moe, ko_batches):
    layer = trained_moe.moe_layers[0]
    with expert_masked(layer, [1, 2]):
        _, routing = _layer_output(trained_moe, ko_batches[0])
        assert not layer.router.expert_mask[[1, 2]].any()
    assert not torch.isin(routing.indices, torch.tensor([1, 2])).any()
    assert routing.kept.all()
    assert layer.router.expert_mask.all()


def _bad_batch(batch: Batch, vocab: int) -> Batch:
    tokens = batch.tokens.clone()
    tokens[0, 0] = vocab + 5  # out of the embedding's range: the forward raises
    return Batch(tokens, batch.targets, batch.domain, batch.doc)


def test_interventions_are_undone_when_the_forward_raises(trained_moe, trained_dense, ko_batches):
    bad = [_bad_batch(ko_batches[0], trained_moe.vocab_size)]
    with pytest.raises(IndexError):
        expert_knockouts(trained_moe, bad, 4)
    assert all(m.router.expert_mask.all() for m in trained_moe.moe_layers)
    with pytest.raises(IndexError):
        top1_knockouts(trained_moe, bad, 4)
    assert all(not m.router._forward_hooks for m in trained_moe.moe_layers)
    before = [b.ffn.w_out.detach().clone() for b in trained_dense.blocks]
    with pytest.raises(IndexError):
        dense_slice_knockouts(trained_dense, bad, 4, blocks=[0, 1], num_slices=4)
    for b, w in zip(trained_dense.blocks, before):
        assert torch.equal(b.ffn.w_out, w)
    assert not trained_moe.training and not trained_dense.training
    with pytest.raises(RuntimeError, match="boom"):
        with expert_masked(trained_moe.moe_layers[1], 3):
            raise RuntimeError("boom")
    assert trained_moe.moe_layers[1].router.expert_mask.all()


def test_hidden_slice_zeroed_equals_masking_the_hidden_units(trained_dense):
    mlp = trained_dense.blocks[0].ffn
    x = torch.randn(10, mlp.w_in.shape[0])
    units = slice(8, 24)
    with torch.no_grad():
        h = activate(x @ mlp.w_in, mlp.activation)
        h[:, units] = 0
        ref = h @ mlp.w_out
        with hidden_slice_zeroed(mlp, units):
            got = mlp(x)
        torch.testing.assert_close(got, ref)
        assert not torch.equal(mlp(x), got)  # restored


def test_hidden_slices_partition_the_width():
    slices = hidden_slices(70, 8)
    covered = np.concatenate([np.arange(70)[s] for s in slices])
    np.testing.assert_array_equal(covered, np.arange(70))
    sizes = [s.stop - s.start for s in slices]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        hidden_slices(3, 4)


def test_top1_dropped_removes_one_kept_slot_per_token(trained_moe, ko_batches):
    layer = trained_moe.moe_layers[0]
    _, intact = _layer_output(trained_moe, ko_batches[0])
    with top1_dropped(layer):
        _, dropped = _layer_output(trained_moe, ko_batches[0])
    assert torch.equal(dropped.indices, intact.indices)  # same choices, only the top-1 slot dropped
    assert (dropped.kept.sum(dim=1) == 1).all()
    top1 = intact.weights.argmax(dim=1)
    assert not dropped.kept[torch.arange(top1.numel()), top1].any()
    assert not layer.router._forward_hooks


def test_selectivity_on_hand_made_damage():
    # [D=4, E=3]: expert 0 hurts one domain, expert 1 all equally, expert 2 nothing.
    damage = np.array([[0.4, 0.1, 0.0], [0.0, 0.1, 0.0], [0.0, 0.1, 0.0], [0.0, 0.1, 0.0]])
    sel = selectivity(damage)
    assert sel[0] == pytest.approx(1.0) and sel[1] == pytest.approx(0.0) and np.isnan(sel[2])
    # Negative damage (the knockout helped) counts as none; stacked [L, D, E] works per layer.
    stacked = np.stack([damage, np.where(damage > 0, damage, -0.05)])
    np.testing.assert_allclose(selectivity(stacked)[1], sel, equal_nan=True)
    # Two of four domains hurt equally: (0.5 - 0.25) / 0.25 / 3 = 1/3.
    assert selectivity(np.array([[1.0], [1.0], [0.0], [0.0]]))[0] == pytest.approx(1 / 3)
    assert np.isnan(selectivity(np.ones((1, 3)))).all()  # one domain: undefined
