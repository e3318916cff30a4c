"""Feed-forward blocks: the dense MLP and the grouped experts that run all experts at once.

One expert and the dense MLP share a weight layout and an init, so a one-expert MoE loaded with
a dense MLP's weights computes the same function (the twins differ in exactly one module):
    w_in  [D, n*F]  (n = 2 for SwiGLU: gate and up projections side by side; 1 for GELU)
    w_out [F, D]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.dispatch import (
    CPU_MAX_PADDING,
    Dispatch,
    ExpertBucket,
    bucket_rows,
    combine,
    cpu_buckets,
    gather_rows,
    permute,
)
from moe.routing import Routing
from moe.validation import check_choice

ACTIVATIONS = ("swiglu", "gelu")


def _check_activation(activation: str) -> int:
    """Number of input projections the activation needs."""
    if activation not in ACTIVATIONS:
        check_choice("activation", activation, ACTIVATIONS)
    return 2 if activation == "swiglu" else 1


def activate(h: Tensor, activation: str) -> Tensor:
    """[..., n*F] -> [..., F]."""
    if activation == "swiglu":
        return _SwiGLU.apply(h)
    return F.gelu(h)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of h = [gate | up] ([..., 2F] -> [..., F]), the two halves of the gradient
    written into one [..., 2F] tensor. Autograd through `chunk` concatenates them instead, a copy of
    the whole gradient: 2-4% of a fine-grained MoE layer's forward+backward on a 2-core CPU. The same
    ops on the same values as autograd's, so the gradient is equal bit for bit."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        silu = F.silu(gate)
        ctx.save_for_backward(h, silu)
        return silu * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        h, silu = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, silu, out=grad_up)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_h


class DenseMLP(nn.Module):
    """The dense twin's FFN: x [.., D] -> [.., D], hidden width F."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        activation: str = "swiglu",
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        n_in = _check_activation(activation)
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(d_model, n_in * hidden))
        self.w_out = nn.Parameter(torch.empty(hidden, d_model))
        nn.init.normal_(self.w_in, std=init_std)
        nn.init.normal_(self.w_out, std=init_std if out_std is None else out_std)

    def forward(self, x: Tensor) -> Tensor:
        return activate(x @ self.w_in, self.activation) @ self.w_out


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: autocast's where it is on for x's device, else x's own.
    Grouped kernels are not autocast ops, so the experts cast their operands themselves."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _LoopGroupedMM(torch.autograd.Function):
    """Per-expert matmuls written straight into one output (no torch.cat, whose copy of the
    [A, O] result costs about as much as the matmuls at small widths), and a weight gradient
    built in place (indexing w[e] in a Python loop would make autograd add E full-size zero
    tensors)."""

    @staticmethod
    def forward(ctx, x_AI: Tensor, w_EIO: Tensor, counts: list[int]) -> Tensor:
        ctx.save_for_backward(x_AI, w_EIO)
        ctx.counts = counts
        out = x_AI.new_empty(x_AI.shape[0], w_EIO.shape[2])
        for e, rows in _expert_rows(counts):
            torch.mm(x_AI[rows], w_EIO[e], out=out[rows])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_AO: Tensor):
        x_AI, w_EIO = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_AO.new_empty(x_AI.shape)
            for e, rows in _expert_rows(ctx.counts):
                torch.mm(grad_AO[rows], w_EIO[e].t(), out=grad_x[rows])
        if ctx.needs_input_grad[1]:
            grad_w = w_EIO.new_zeros(w_EIO.shape)  # experts without tokens get zero gradient
            for e, rows in _expert_rows(ctx.counts):
                torch.mm(x_AI[rows].t(), grad_AO[rows], out=grad_w[e])
        return grad_x, grad_w, None


def _expert_rows(counts: list[int]):
    """(expert, row slice) for each expert with rows, in expert order."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def grouped_mm(x_AI: Tensor, w_EIO: Tensor, counts_E: Tensor) -> Tensor:
    """Per-expert matmul over tokens sorted by expert: rows [start_e, end_e) of x times w[e].

    Args: x_AI [A, I] sorted by expert; w_EIO [E, I, O]; counts_E [E] rows per expert.
    Returns [A, O].

    On CUDA with bf16 and 16-byte-aligned sizes it is one `torch._grouped_mm` kernel (autograd
    supported there); elsewhere a loop of one matmul per expert (`_LoopGroupedMM`): on CPU in torch
    2.13 `torch.nn.functional.grouped_mm` has a backward too, but forward+backward of 8192 rows
    x 8 experts (256 -> 1024) took 175 ms against the loop's 140-150 ms.
    """
    if (
        x_AI.is_cuda
        and hasattr(torch, "_grouped_mm")
        and x_AI.dtype == torch.bfloat16
        and w_EIO.dtype == torch.bfloat16
        and x_AI.shape[1] % 8 == 0
        and w_EIO.shape[2] % 8 == 0
    ):
        offsets = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return torch._grouped_mm(x_AI, w_EIO, offs=offsets)
    return _LoopGroupedMM.apply(x_AI, w_EIO, counts_E.tolist())


def padded_mm(x_PI: Tensor, w_EIO: Tensor, buckets: tuple[ExpertBucket, ...]) -> Tensor:
    """Per-expert matmul over the padded layout (`moe.dispatch`): x_PI [P, I] holds each bucket's
    experts side by side, C_b rows each; w_EIO [E, I, O]. Returns [P, O].

    One bucket is every expert in id order: one batched matmul on the weights as they are. Several
    buckets run one batched matmul each on their experts' weights, gathered (`_BucketedMM`)."""
    if len(buckets) == 1:
        return torch.bmm(x_PI.view(w_EIO.shape[0], buckets[0].capacity, -1), w_EIO).view(x_PI.shape[0], -1)
    return _BucketedMM.apply(x_PI, w_EIO, buckets)


class _BucketedMM(torch.autograd.Function):
    """Batched matmuls per bucket written straight into one output, and a weight gradient built in
    place: autograd through `w[experts]` gathers would add a zero-filled [E, I, O] gradient per
    bucket, and concatenating the buckets' outputs would copy the [P, O] result."""

    @staticmethod
    def forward(ctx, x_PI: Tensor, w_EIO: Tensor, buckets: tuple[ExpertBucket, ...]) -> Tensor:
        weights = [w_EIO.index_select(0, b.experts) for b in buckets]
        ctx.save_for_backward(x_PI, *weights)
        ctx.buckets = buckets
        ctx.weight_shape = w_EIO.shape
        out = x_PI.new_empty(x_PI.shape[0], w_EIO.shape[2])
        for rows, b, w in zip(bucket_rows(buckets), buckets, weights):
            n = b.experts.numel()
            torch.bmm(x_PI[rows].view(n, b.capacity, -1), w, out=out[rows].view(n, b.capacity, -1))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_PO: Tensor):
        x_PI, *weights = ctx.saved_tensors
        grad_PO = grad_PO.contiguous()  # the buckets' rows are viewed as [n, C_b, O] blocks
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_PO.new_empty(x_PI.shape)
            for rows, b, w in zip(bucket_rows(ctx.buckets), ctx.buckets, weights):
                n = b.experts.numel()
                g = grad_PO[rows].view(n, b.capacity, -1)
                torch.bmm(g, w.transpose(1, 2), out=grad_x[rows].view(n, b.capacity, -1))
        if ctx.needs_input_grad[1]:
            grad_w = grad_PO.new_empty(ctx.weight_shape)  # every expert lies in exactly one bucket
            for rows, b in zip(bucket_rows(ctx.buckets), ctx.buckets):
                n = b.experts.numel()
                x = x_PI[rows].view(n, b.capacity, -1)
                grad_w.index_copy_(0, b.experts, torch.bmm(x.transpose(1, 2), grad_PO[rows].view(n, b.capacity, -1)))
        return grad_x, grad_w, None


class GroupedExperts(nn.Module):
    """The native experts backend: E experts with stacked weights w_in [E, D, n*F] and w_out
    [E, F, D], and their dispatch (`moe.dispatch`): `forward(x_TD, routing)` groups the kept
    assignments' rows by expert, runs the grouped matmuls (`compute_rows`) and sums each token's
    gated outputs back in place.
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        num_experts: int,
        activation: str = "swiglu",
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        n_in = _check_activation(activation)
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, n_in * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        nn.init.normal_(self.w_in, std=init_std)
        nn.init.normal_(self.w_out, std=init_std if out_std is None else out_std)

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    def forward(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """Tokens x_TD [T, D] and their routing -> sum over kept slots of gate * expert(x) [T, D]."""
        dispatch = self.dispatch(routing, x_TD.is_cuda)
        y_PD = self.compute_rows(gather_rows(x_TD, dispatch), dispatch.row_gate, dispatch.counts, dispatch.buckets)
        return combine(y_PD, dispatch, x_TD.shape[0])

    def dispatch(self, routing: Routing, cuda: bool) -> Dispatch:
        """The layout `forward` runs the routing in: ragged on CUDA (grouped matmul kernels want it);
        on the CPU padded, in load buckets, while that costs few extra rows."""
        if cuda:
            return permute(routing, max_padding=None)
        return permute(routing, max_padding=CPU_MAX_PADDING, buckets=cpu_buckets(self.num_experts))

    def compute_rows(
        self, x_PD: Tensor, gate_P: Tensor, counts_E: Tensor, buckets: tuple[ExpertBucket, ...] | None = None
    ) -> Tensor:
        """Expert rows [P, D], gate weights [P] -> gated outputs gate * expert(x) [P, D].

        With `buckets` the rows are the padded layout (`moe.dispatch`): each bucket's experts side by
        side with C_b rows each, one batched matmul per bucket; without them they are ragged groups of
        `counts_E` rows (P = A).
        """
        x_PD = x_PD.to(compute_dtype(x_PD))  # bf16 under CUDA autocast: the torch._grouped_mm path
        w_in, w_out = self.w_in.to(x_PD.dtype), self.w_out.to(x_PD.dtype)
        gate_P1 = gate_P.to(x_PD.dtype).unsqueeze(-1)
        # The gate is linear in the output, so scale whichever of hidden (F) and output (D) is narrower.
        gate_hidden = w_out.shape[1] < w_out.shape[2]
        if buckets is not None:
            h_PF = activate(padded_mm(x_PD, w_in, buckets), self.activation)
            if gate_hidden:
                h_PF = h_PF * gate_P1
            y_PD = padded_mm(h_PF, w_out, buckets)
        else:
            h_PF = activate(grouped_mm(x_PD, w_in, counts_E), self.activation)
            if gate_hidden:
                h_PF = h_PF * gate_P1
            y_PD = grouped_mm(h_PF, w_out, counts_E)
        return y_PD if gate_hidden else y_PD * gate_P1

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """One expert on arbitrary tokens (probes for redundancy analysis): [N, D] -> [N, D]."""
        return activate(x_ND @ self.w_in[expert], self.activation) @ self.w_out[expert]
