"""Token dispatcher: lay the kept (token, expert) assignments out by expert, and sum the expert
outputs back into token order.

Two layouts of the P expert rows:
- `padded`: the experts in buckets of similar load (`ExpertBucket`), each expert C_b rows (C_b = the
  largest load in its bucket); each bucket runs as one batched matmul. With one bucket (the default)
  that is E groups of C rows, C = the largest load. Pad rows hold a copy of token 0 with gate 0, so
  they add nothing and receive no gradient.
- `ragged`: the A kept assignments sorted by expert (P = A); experts run as a grouped matmul.
The padded layout is chosen when padding costs at most `max_padding` extra rows (near-balanced
routing): one batched matmul beats a loop of per-expert matmuls on the CPU while the pad rows are
few (`CPU_MAX_PADDING`). Buckets keep the pad rows few when there are many experts: with E = 64 the
largest of 64 loads sits further above the mean than the largest of each 16 (`cpu_buckets`).

Gate weights are applied per row inside the experts (on the hidden activations, F wide rather
than D), so combining is a plain sum of each token's rows. Dropless routing (every slot kept, the
default) makes the slots and the real rows a bijection (`slot_row`), so both directions are
gathers: combine reads each token's k rows and sums them in slot order, and the gather's backward
does the same with the gradient; a scatter-add (`index_add`, sequential on CPU) is needed only when
capacity or a knockout drops slots. Either way the result is the same bit for bit on every run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moe.routing import Routing

# Padding pays while its wasted rows cost less than the ragged layout's loop of E matmuls. Measured
# on a 2-core CPU (torch 2.13, 4096 tokens, fwd+bwd, padded/ragged time): E=8 d=256 f=512: 0.99 at
# 3% extra rows, 1.09 at 18%, 1.31 at 41%; E=8 d=128 f=256: 0.92 at 3%, 1.05 at 18%; E=64 d=256
# f=64: 0.93 at 8%, 1.09 at 32%, 1.55 at 88%. The ragged layout's time does not grow with skew.
CPU_MAX_PADDING = 0.15
# Experts per bucket of the padded layout on a CPU. E=64 k=8 d=256 f=64 (4096 tokens, fwd+bwd of the
# expert matmuls, the weight gathers included): 4 buckets of 16 cut the pad rows from 16% to 4% and
# the time from 104 to 96 ms; E=8 (2 buckets: 4.7% -> 1.8%) gained nothing, so fewer than 32 experts
# keep one bucket and their weights in place.
CPU_EXPERTS_PER_BUCKET = 16


def cpu_buckets(num_experts: int) -> int:
    """Buckets of the padded layout on a CPU for E experts: one per 16 (one below 32)."""
    return max(1, num_experts // CPU_EXPERTS_PER_BUCKET)


@dataclass(frozen=True)
class ExpertBucket:
    """Experts [n] (int64 ids, ascending) whose rows the padded layout holds side by side, C =
    `capacity` rows each, in that order."""

    experts: Tensor
    capacity: int


def load_buckets(counts: Tensor, buckets: int) -> tuple[ExpertBucket, ...]:
    """The experts split into `buckets` groups of consecutive load rank (as equal in size as E
    allows), each with capacity = its largest load; one bucket is every expert in id order."""
    num_experts = counts.numel()
    if buckets <= 1 or num_experts < 2:
        return (ExpertBucket(torch.arange(num_experts, device=counts.device), int(counts.max())),)
    by_load = torch.sort(counts, stable=True).indices
    groups = torch.tensor_split(by_load, min(buckets, num_experts))
    return tuple(ExpertBucket(torch.sort(g).values, int(counts[g].max())) for g in groups)


def bucket_rows(buckets: tuple[ExpertBucket, ...]) -> Iterator[slice]:
    """The row slice of each bucket in the padded layout, in order: n_b * C_b rows each."""
    start = 0
    for b in buckets:
        end = start + b.experts.numel() * b.capacity
        yield slice(start, end)
        start = end


@dataclass(frozen=True)
class Dispatch:
    """Where each kept assignment goes.

    Attributes:
        row_token: [P] the token each expert row reads and writes back to.
        row_gate:  [P] the gate weight of each row (0 for pad rows), float32, carries gradient.
        counts:    [E] kept assignments per expert.
        buckets:   the padded layout's expert buckets, in row order; None for the ragged layout.
        slot_row:  [T*K] the row of each (token, slot) when every slot is kept; None otherwise.
    """

    row_token: Tensor
    row_gate: Tensor
    counts: Tensor
    buckets: tuple[ExpertBucket, ...] | None
    slot_row: Tensor | None = None


def permute(routing: Routing, max_padding: float | None = 1.0, buckets: int = 1) -> Dispatch:
    """Group kept assignments by expert (stable sort, so ties keep token order).

    `max_padding`: use the padded layout, its experts in `buckets` buckets of similar load
    (`load_buckets`), when its rows sum_b n_b * C_b <= (1 + max_padding) * A; None = never.
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
    layout = load_buckets(counts, buckets) if max_padding is not None and num_kept > 0 else None
    padded_rows = 0 if layout is None else sum(b.experts.numel() * b.capacity for b in layout)
    gates = routing.weights.reshape(-1)
    dropless = num_kept == flat_experts.numel()

    def slot_rows(rows_of_sorted: Tensor) -> Tensor | None:
        if not dropless:
            return None
        slot_row = torch.empty_like(slots)
        slot_row[slots] = rows_of_sorted
        return slot_row

    if layout is None or max_padding is None or padded_rows > (1 + max_padding) * num_kept:
        return Dispatch(
            row_token=slots // top_k,
            row_gate=gates[slots],
            counts=counts,
            buckets=None,
            slot_row=slot_rows(torch.arange(num_kept, device=slots.device)),
        )
    # Each expert's first row: its bucket's first row plus its place in the bucket times C_b.
    first_row = torch.empty(num_experts, dtype=torch.long, device=slots.device)
    for b, bucket_slice in zip(layout, bucket_rows(layout)):
        first_row[b.experts] = bucket_slice.start + b.capacity * torch.arange(b.experts.numel(), device=slots.device)
    starts = torch.cumsum(counts, 0) - counts
    rows = first_row[sorted_experts] + (torch.arange(num_kept, device=slots.device) - starts[sorted_experts])
    # Pad rows point at slot T*K, an appended zero gate, and at token 0.
    row_slot = torch.full((padded_rows,), gates.numel(), dtype=torch.long, device=slots.device)
    row_slot[rows] = slots
    row_gate = torch.cat([gates, gates.new_zeros(1)])[row_slot]
    row_token = torch.where(row_slot < gates.numel(), row_slot // top_k, 0)
    return Dispatch(row_token=row_token, row_gate=row_gate, counts=counts, buckets=layout, slot_row=slot_rows(rows))


def _sum_slots(rows_PD: Tensor, slot_row: Tensor, num_tokens: int) -> Tensor:
    """[P, D] rows -> [T, D]: token t's K rows summed in slot order.

    `embedding_bag` gathers and sums in one pass, without the [T, K, D] copy that index_select
    then sum would write (equal bit for bit, and faster on CPU).
    """
    if num_tokens == 0:
        return rows_PD.new_zeros(0, rows_PD.shape[1])
    slots_per_token = slot_row.numel() // num_tokens
    return F.embedding_bag(slot_row.view(num_tokens, slots_per_token), rows_PD, mode="sum")


def _real_row_tokens(dispatch: Dispatch, num_tokens: int) -> Tensor:
    """[P] row -> token, with pad rows (padded layout) sent to token T (a zero row)."""
    if dispatch.buckets is None:
        return dispatch.row_token
    real = torch.zeros(dispatch.row_token.numel(), dtype=torch.bool, device=dispatch.row_token.device)
    real[dispatch.slot_row] = True
    return torch.where(real, dispatch.row_token, num_tokens)


class _GatherRows(torch.autograd.Function):
    """x [T, D] -> rows [P, D]; backward sums each token's row gradients by gather (no scatter)."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, row_token: Tensor, slot_row: Tensor) -> Tensor:
        ctx.save_for_backward(slot_row)
        ctx.num_tokens = x_TD.shape[0]
        return x_TD.index_select(0, row_token)

    @staticmethod
    def backward(ctx, grad_PD: Tensor):
        (slot_row,) = ctx.saved_tensors
        return _sum_slots(grad_PD, slot_row, ctx.num_tokens), None, None


class _CombineRows(torch.autograd.Function):
    """rows [P, D] -> [T, D] by gather + sum; backward hands each row its token's gradient (pad
    rows, which no token reads, index a zero row and get zero)."""

    @staticmethod
    def forward(ctx, y_PD: Tensor, slot_row: Tensor, row_token: Tensor, num_tokens: int) -> Tensor:
        ctx.save_for_backward(row_token)
        ctx.padded = y_PD.shape[0] != slot_row.numel()
        return _sum_slots(y_PD, slot_row, num_tokens)

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        (row_token,) = ctx.saved_tensors
        if ctx.padded:
            grad_TD = torch.cat([grad_TD, grad_TD.new_zeros(1, grad_TD.shape[1])])
        return grad_TD.index_select(0, row_token), None, None, None


def gather_rows(x_TD: Tensor, dispatch: Dispatch) -> Tensor:
    """[T, D] -> [P, D] expert rows."""
    if dispatch.slot_row is None:
        return x_TD.index_select(0, dispatch.row_token)
    return _GatherRows.apply(x_TD, dispatch.row_token, dispatch.slot_row)


def combine(y_PD: Tensor, dispatch: Dispatch, num_tokens: int) -> Tensor:
    """Gated expert rows [P, D] -> [T, D]: each token sums the rows of its kept assignments."""
    if dispatch.slot_row is None:
        return y_PD.new_zeros(num_tokens, y_PD.shape[1]).index_add(0, dispatch.row_token, y_PD)
    return _CombineRows.apply(y_PD, dispatch.slot_row, _real_row_tokens(dispatch, num_tokens), num_tokens)
