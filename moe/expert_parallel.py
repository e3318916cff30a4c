"""Expert parallelism: each rank of an expert-parallel group holds E/ep of a layer's experts, and
tokens travel to the rank holding their expert and back with `all_to_all_single`.

The router, the routing record and the balancing losses are computed on the rank that owns the
tokens, exactly as on one process; only the expert rows move. One layer's forward on a rank:

    permute    kept assignments sorted by (global) expert: A rows, counts [E]
    exchange   per-expert counts [ep, E/ep] (equal splits), so each rank knows what it receives
    dispatch   rows and gates -> the owner ranks (uneven splits: rows per destination rank)
    compute    received rows regrouped by local expert, the local grouped experts run on them
    return     gated outputs -> the source ranks (the splits reversed), combined per token

Both all-to-alls are differentiable (the backward is the all-to-all with the splits reversed), so
the gradient of a local expert's weights sums the contributions of every token routed to it from
every rank of its expert-parallel group, and the router's gradient flows back through the gates.
Dropless by default; a capacity limit drops assignments in the router over the rank's own tokens,
as on one process (`Routing.kept`), and dropped assignments never travel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moe.dispatch import combine, gather_rows, permute
from moe.experts import GroupedExperts
from moe.routing import Routing


class _AllToAll(torch.autograd.Function):
    """rows [sum(in_splits), ...] -> [sum(out_splits), ...] over `group`; rank r's i-th slice of
    `in_splits[i]` rows goes to rank i. Backward: the same exchange with the splits reversed."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Differentiable uneven all-to-all of rows (dim 0); see `_AllToAll`."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(counts_E: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Each rank's rows per global expert [E] -> rows this rank receives per (source rank, local
    expert) [ep, E/ep]. Counts carry no gradient."""
    ep = dist.get_world_size(group)
    received = torch.empty_like(counts_E)
    dist.all_to_all_single(received, counts_E.contiguous(), group=group)
    return received.view(ep, -1)


class ExpertParallelExperts(GroupedExperts):
    """This rank's E/ep experts of a layer (stacked weights w_in [E/ep, D, n*F], w_out [E/ep, F, D],
    experts `first_expert` .. `first_expert + E/ep - 1` of the layer), with the all-to-all dispatch
    (see the module docstring). `num_experts` is the layer's global E, what the router chooses
    among; `local_experts` is E/ep.

    Built from a full `GroupedExperts` by `shard` (every rank builds the same full layer from the
    same seed, so an expert-parallel model starts from the weights of the one-process model).
    """

    def __init__(self, full: GroupedExperts, group: dist.ProcessGroup):
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        total = full.num_experts
        if total % ep:
            raise ValueError(
                f"expert parallelism over {ep} ranks needs the routed experts ({total}) to be a multiple of "
                f"{ep}; set trainer.parallel.ep to a divisor of {total}"
            )
        local = total // ep
        super().__init__(full.w_in.shape[1], full.w_out.shape[1], local, full.activation)
        self.group = group
        self.ep = ep
        self.total_experts = total
        self.first_expert = rank * local
        with torch.no_grad():
            self.w_in.copy_(full.w_in[self.first_expert : self.first_expert + local])
            self.w_out.copy_(full.w_out[self.first_expert : self.first_expert + local])

    @property
    def num_experts(self) -> int:
        return self.total_experts

    @property
    def local_experts(self) -> int:
        return self.w_in.shape[0]

    def forward(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """Tokens x_TD [T, D] of this rank and their routing over the E global experts -> sum over
        kept slots of gate * expert(x) [T, D], the experts computed on their owner ranks."""
        dispatch = permute(routing, max_padding=None)  # ragged: rows sorted by global expert
        send_SE = dispatch.counts.view(self.ep, self.local_experts)  # [ep destination, E/ep]
        recv_SE = exchange_counts(dispatch.counts, self.group)  # [ep source, E/ep]
        send_splits, recv_splits = send_SE.sum(1).tolist(), recv_SE.sum(1).tolist()
        x_RD = all_to_all(gather_rows(x_TD, dispatch), recv_splits, send_splits, self.group)
        gate_R = all_to_all(dispatch.row_gate, recv_splits, send_splits, self.group)
        # Received rows are source-major; the grouped matmul wants them expert-major.
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.local_experts, device=x_RD.device).repeat(self.ep), recv_SE.reshape(-1)
        )
        order = torch.sort(expert_of_row, stable=True).indices
        y_RD = self.compute_rows(x_RD[order], gate_R[order], recv_SE.sum(0))
        y_RD = y_RD.index_select(0, torch.argsort(order))  # back to source-major
        y_AD = all_to_all(y_RD, send_splits, recv_splits, self.group)
        return combine(y_AD, dispatch, x_TD.shape[0])

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """One of this rank's experts (global index) on any rows [N, D] -> [N, D]."""
        local = expert - self.first_expert
        if not 0 <= local < self.local_experts:
            raise ValueError(
                f"expert {expert} lives on another expert-parallel rank (this one holds "
                f"{self.first_expert}..{self.first_expert + self.local_experts - 1}); analyze the "
                "consolidated checkpoint instead"
            )
        return super().expert_forward(local, x_ND)
