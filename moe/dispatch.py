"""Token dispatcher: lay the kept (token, expert) assignments out by expert, and sum the expert
outputs back into token order.

Two layouts of the P expert rows:
- `padded`: E groups of C rows (C = the largest expert load); experts run as one batched matmul.
  Pad rows hold a copy of token 0 with gate 0, so they add nothing and receive no gradient.
- `ragged`: the A kept assignments sorted by expert (P = A); experts run as a grouped matmul.
The padded layout is chosen when padding costs at most `max_padding` extra rows (balanced
routing): one batched matmul is much faster than a loop of small per-expert matmuls on the CPU.

Gate weights are applied per row inside the experts (on the hidden activations, F wide rather
than D), so combining is a plain `index_add` of rows into their tokens; on the CPU it runs
sequentially over rows, so the result is the same bit for bit on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe.routing import Routing


@dataclass(frozen=True)
class Dispatch:
    """Where each kept assignment goes.

    Attributes:
        row_token: [P] the token each expert row reads and writes back to.
        row_gate:  [P] the gate weight of each row (0 for pad rows), float32, carries gradient.
        counts:    [E] kept assignments per expert.
        capacity:  C rows per expert in the padded layout; None for the ragged layout.
    """

    row_token: Tensor
    row_gate: Tensor
    counts: Tensor
    capacity: int | None


def permute(routing: Routing, max_padding: float | None = 1.0) -> Dispatch:
    """Group kept assignments by expert (stable sort, so ties keep token order).

    `max_padding`: use the padded layout when E*C <= (1 + max_padding) * A; None = never.
    """
    num_experts, top_k = routing.num_experts, routing.top_k
    flat_experts = routing.indices.reshape(-1)
    if bool(routing.kept.all()):
        slots = torch.sort(flat_experts, stable=True).indices
    else:
        kept_slots = torch.nonzero(routing.kept.reshape(-1)).squeeze(-1)
        slots = kept_slots[torch.sort(flat_experts[kept_slots], stable=True).indices]
    sorted_experts = flat_experts[slots]
    counts = torch.bincount(sorted_experts, minlength=num_experts)
    num_kept = slots.numel()
    capacity = int(counts.max()) if num_kept else 0
    padded = (max_padding is not None and num_kept > 0
              and num_experts * capacity <= (1 + max_padding) * num_kept)
    gates = routing.weights.reshape(-1)
    if not padded:
        return Dispatch(row_token=slots // top_k, row_gate=gates[slots], counts=counts, capacity=None)
    starts = torch.cumsum(counts, 0) - counts
    rows = sorted_experts * capacity + (torch.arange(num_kept, device=slots.device) - starts[sorted_experts])
    # Pad rows point at slot T*K, an appended zero gate, and at token 0.
    row_slot = torch.full((num_experts * capacity,), gates.numel(), dtype=torch.long, device=slots.device)
    row_slot[rows] = slots
    row_gate = torch.cat([gates, gates.new_zeros(1)])[row_slot]
    row_token = torch.where(row_slot < gates.numel(), row_slot // top_k, 0)
    return Dispatch(row_token=row_token, row_gate=row_gate, counts=counts, capacity=capacity)


def gather_rows(x_TD: Tensor, dispatch: Dispatch) -> Tensor:
    """[T, D] -> [P, D] expert rows."""
    return x_TD.index_select(0, dispatch.row_token)


def combine(y_PD: Tensor, dispatch: Dispatch, num_tokens: int) -> Tensor:
    """Gated expert rows [P, D] -> [T, D]: each token sums the rows of its kept assignments."""
    return y_PD.new_zeros(num_tokens, y_PD.shape[1]).index_add(0, dispatch.row_token, y_PD)
