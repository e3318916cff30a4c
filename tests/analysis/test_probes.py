"""Expert CKA probes: captured inputs are the MoE layer's inputs, copies of one expert are fully
redundant, and the numbers agree with the CKA helper run by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.probes import capture_layer_inputs, expert_cka, expert_outputs, mean_offdiagonal
from analysis.similarity import linear_cka
from analysis.verdict import ENSEMBLE, judge_cka


def test_captured_inputs_are_the_normed_block_inputs(trained_moe, val_by_domain):
    batches = next(iter(val_by_domain.values()))
    xs = capture_layer_inputs(trained_moe, batches, max_tokens=100)
    assert [x.shape for x in xs] == [(100, 32), (100, 32)]
    seen = {}
    block = trained_moe.blocks[0]
    handle = block.ffn_norm.register_forward_hook(lambda m, a, o: seen.setdefault("x", o))
    try:
        with torch.no_grad():
            trained_moe(batches[0].tokens)
    finally:
        handle.remove()
    torch.testing.assert_close(xs[0], seen["x"].reshape(-1, 32)[:100])
    assert all(not layer._forward_pre_hooks for layer in trained_moe.moe_layers)


def test_cka_matrix_matches_the_helper_by_hand(trained_moe, val_by_domain):
    batches = next(iter(val_by_domain.values()))
    cka = expert_cka(trained_moe, batches, max_tokens=256)
    assert cka.shape == (2, 4, 4)
    np.testing.assert_allclose(cka, np.transpose(cka, (0, 2, 1)))
    np.testing.assert_allclose(np.diagonal(cka, axis1=1, axis2=2), 1.0)
    x = capture_layer_inputs(trained_moe, batches, max_tokens=256)[1]
    outs = expert_outputs(trained_moe.moe_layers[1], x).double().numpy()
    assert cka[1, 0, 3] == pytest.approx(linear_cka(outs[0], outs[3]))


def test_copies_of_one_expert_are_fully_redundant(make_model, synthetic_data, val_by_domain):
    model = make_model(synthetic_data.tokenizer.vocab_size, n_layers=1).eval()
    experts = model.moe_layers[0].experts
    with torch.no_grad():
        experts.w_in.copy_(experts.w_in[:1].expand_as(experts.w_in))
        experts.w_out.copy_(experts.w_out[:1].expand_as(experts.w_out))
    cka = expert_cka(model, next(iter(val_by_domain.values())), max_tokens=256)[0]
    np.testing.assert_allclose(cka, 1.0, atol=1e-9)
    assert judge_cka(mean_offdiagonal(cka)).verdict == ENSEMBLE


def test_mean_offdiagonal_ignores_nan():
    m = np.array([[1.0, 0.2, np.nan], [0.2, 1.0, 0.4], [np.nan, 0.4, 1.0]])
    assert mean_offdiagonal(m) == pytest.approx(0.3)
    assert np.isnan(mean_offdiagonal(np.eye(1)))
