"""Balancing losses against closed forms, the global-batch scope across ranks, aux-free bias."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe.balance import BalanceConfig, LoadBalancer, load_balancing_loss, max_violation, router_z_loss
from moe.routers import build_router, router_config
from moe.routing import Routing

E, K = 4, 2


def record(probs, indices) -> Routing:
    logits = probs.log()
    return Routing(indices, probs.gather(-1, indices), logits, probs, torch.ones_like(indices, dtype=torch.bool))


def balanced_indices(T):
    # token t -> experts (t, t+1) mod E: every expert gets exactly T*K/E assignments
    t = torch.arange(T)
    return torch.stack([t % E, (t + 1) % E], dim=-1)


def test_lbl_is_one_at_perfect_balance_and_larger_when_skewed():
    T = 8
    uniform = torch.full((T, E), 1 / E)
    assert load_balancing_loss(uniform, balanced_indices(T), E).item() == pytest.approx(1.0, abs=1e-7)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(T, 1)
    skewed_idx = torch.tensor([[0, 1]]).repeat(T, 1)
    value = load_balancing_loss(skewed_probs, skewed_idx, E).item()
    # closed form: E/(kT) * (T*0.7 + T*0.1) = 4/2 * 0.8
    assert value == pytest.approx(E / K * 0.8)
    assert value > 1


def test_lbl_matches_naive_formula():
    torch.manual_seed(0)
    T = 50
    probs = torch.softmax(torch.randn(T, E), -1)
    idx = probs.topk(K).indices
    naive = 0.0
    for e in range(E):
        count = sum(int(e in row) for row in idx.tolist())
        naive += count * probs[:, e].mean().item()
    assert load_balancing_loss(probs, idx, E).item() == pytest.approx(E / (K * T) * naive, rel=1e-6)


def test_z_loss_closed_form():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_max_violation():
    assert max_violation(torch.tensor([5, 5, 5, 5])) == 0.0
    assert max_violation(torch.tensor([20, 0, 0, 0])) == pytest.approx(3.0)


def test_sequence_scope_averages_per_sequence_losses():
    torch.manual_seed(1)
    B, S = 3, 6
    probs = torch.softmax(torch.randn(B * S, E), -1)
    idx = probs.topk(K).indices
    balancer = LoadBalancer(BalanceConfig(scope="sequence", lbl_coef=1.0, z_coef=0.0), E)
    got = balancer.aux_losses([record(probs, idx)], seq_len=S).lbl
    expected = torch.stack(
        [load_balancing_loss(probs[b * S : (b + 1) * S], idx[b * S : (b + 1) * S], E) for b in range(B)]
    ).mean()
    torch.testing.assert_close(got, expected)


def test_losses_average_over_layers_with_their_coefficients():
    torch.manual_seed(2)
    recs = []
    for _ in range(3):
        p = torch.softmax(torch.randn(10, E), -1)
        recs.append(record(p, p.topk(K).indices))
    balancer = LoadBalancer(BalanceConfig(scope="micro_batch", lbl_coef=0.1, z_coef=0.01), E)
    out = balancer.aux_losses(recs, seq_len=10)
    lbl = sum(load_balancing_loss(r.probs, r.indices, E) for r in recs) / 3
    z = sum(router_z_loss(r.logits) for r in recs) / 3
    torch.testing.assert_close(out.lbl, lbl)
    torch.testing.assert_close(out.total, 0.1 * lbl + 0.01 * z)


def test_global_batch_accumulation_buffer_resets_each_step():
    torch.manual_seed(3)
    balancer = LoadBalancer(BalanceConfig(scope="global_batch", lbl_coef=1.0), E)
    micro = []
    for _ in range(2):
        p = torch.softmax(torch.randn(6, E), -1)
        micro.append(record(p, p.topk(K).indices))
    balancer.aux_losses([micro[0]], 6)
    second = balancer.aux_losses([micro[1]], 6).lbl
    # second micro-step uses the counts of both micro-steps so far
    both = torch.cat([micro[0].indices, micro[1].indices])
    counts = torch.bincount(both.reshape(-1), minlength=E)
    expected = load_balancing_loss(micro[1].probs, micro[1].indices, E, counts_E=counts, num_tokens=12)
    torch.testing.assert_close(second, expected)
    loads = balancer.end_step()
    assert torch.equal(loads[0], counts.double())
    # after the optimizer step, a fresh buffer: equals the micro-batch loss again
    fresh = balancer.aux_losses([micro[1]], 6).lbl
    torch.testing.assert_close(fresh, load_balancing_loss(micro[1].probs, micro[1].indices, E))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch_worker(rank, world, port, probs, idx, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        T = probs.shape[0] // world
        local_p = probs[rank * T : (rank + 1) * T].clone().requires_grad_(True)
        balancer = LoadBalancer(BalanceConfig(scope="global_batch", lbl_coef=1.0), E)
        lbl = balancer.aux_losses([record(local_p, idx[rank * T : (rank + 1) * T])], T).lbl
        # the reported value is detached; recompute with the reduced counts to get the gradient
        counts = balancer.end_step()[0]
        value = load_balancing_loss(
            local_p, idx[rank * T : (rank + 1) * T], E, counts_E=counts, num_tokens=float(counts.sum()) / K
        )
        value.backward()
        out[rank] = torch.cat([lbl.reshape(1), value.detach().reshape(1), counts.float(), local_p.grad.reshape(-1)])
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_global_batch_counts_reduced_over_two_gloo_ranks_give_the_concatenated_loss():
    torch.manual_seed(4)
    T, world = 12, 2
    probs = torch.softmax(torch.randn(world * T, E), -1)
    idx = torch.randint(0, E, (world * T, 1)).repeat(1, K)
    idx[:, 1] = (idx[:, 0] + 1 + torch.randint(0, E - 1, (world * T,))) % E
    out = torch.zeros(world, 2 + E + T * E).share_memory_()
    mp.start_processes(
        _global_batch_worker, args=(world, _free_port(), probs, idx, out), nprocs=world, start_method="spawn"
    )
    full_p = probs.clone().requires_grad_(True)
    full = load_balancing_loss(full_p, idx, E)
    (full * world).backward()  # DDP averages gradients of per-rank losses; compare sums
    rank_lbl = out[:, 0]
    torch.testing.assert_close(rank_lbl.mean(), full.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[:, 1], rank_lbl)
    counts = torch.bincount(idx.reshape(-1), minlength=E).float()
    assert torch.equal(out[0, 2 : 2 + E], counts) and torch.equal(out[1, 2 : 2 + E], counts)
    grads = out[:, 2 + E :].reshape(world * T, E)
    torch.testing.assert_close(grads, full_p.grad, rtol=1e-5, atol=1e-7)


def test_aux_free_bias_changes_selection_never_weights_and_balances_load():
    torch.manual_seed(5)
    D, T, E8, k = 8, 512, 8, 2
    router = build_router(router_config("sigmoid", renormalize=False, bias_update_rate=0.01), D, E8, k, None)
    x = torch.randn(T, D)
    x[:, 0] = 1.0
    with torch.no_grad():
        router.weight.normal_(std=0.5)
        router.weight[0, 0] = 3.0  # experts 0 and 1 favoured by every token
        router.weight[1, 0] = 2.5
    before = router(x)
    start_vio = max_violation(before.selected_counts())
    for _ in range(300):
        r = router(x)
        router.after_step(r.selected_counts().double())
    after = router(x)
    assert max_violation(after.selected_counts()) < 0.5 * start_vio
    assert not torch.equal(after.indices, before.indices)
    # weights are the unbiased sigmoid scores of whatever experts were selected
    torch.testing.assert_close(after.weights, torch.sigmoid(after.logits).gather(-1, after.indices))
    torch.testing.assert_close(after.logits, before.logits)


def test_bad_scope_names_allowed_values():
    with pytest.raises(ValueError, match="balance.scope='everywhere'.*global_batch"):
        LoadBalancer(BalanceConfig(scope="everywhere"), E)
