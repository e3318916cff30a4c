"""Functional redundancy of experts: every expert of a layer on the same probe tokens, compared by
linear CKA (`analysis.similarity.cka_matrix`).

Legend: L MoE layers, N probe tokens, D model dim, E experts.

The probe inputs of a layer are what its experts actually receive: the normed hidden states entering
the MoE layer, captured by a forward pre-hook. Every expert then runs on all N of them through
`GroupedExperts.expert_forward` (ungated), whether or not the router would send them there, so the
comparison is of the functions the experts compute, not of the tokens they happen to see.
CKA near 1 for all pairs: the experts are interchangeable (an ensemble of near copies); low CKA:
they compute different functions (necessary, not sufficient, for specialization).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from analysis.similarity import cka_matrix
from moe.data.batch import Batch
from moe.modes import eval_mode
from moe.protocols import RoutedLayer, RoutedModel

__all__ = ["capture_layer_inputs", "expert_cka", "expert_outputs", "mean_offdiagonal"]


@torch.no_grad()
def capture_layer_inputs(model: RoutedModel, batches: Sequence[Batch], max_tokens: int) -> list[Tensor]:
    """The inputs x [N, D] of each MoE layer (depth order) over the first N <= max_tokens tokens
    of `batches`, in eval mode; the hooks are removed and the mode restored on exit."""
    layers = model.moe_layers
    if not layers:
        raise ValueError("the model has no MoE layer")
    device = next(model.parameters()).device
    captured: list[list[Tensor]] = [[] for _ in layers]

    def pre_hook(index: int):
        def hook(module: nn.Module, args) -> None:
            x = args[0]
            captured[index].append(x.detach().reshape(-1, x.shape[-1]))

        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i)) for i, layer in enumerate(layers)]
    seen = 0
    try:
        with eval_mode(model):
            for batch in batches:
                if seen >= max_tokens:
                    break
                model(batch.tokens.to(device), None, batch.domain.to(device))
                seen += batch.num_tokens
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("no probe tokens: empty batches or max_tokens < 1")
    return [torch.cat(chunks)[:max_tokens] for chunks in captured]


@torch.no_grad()
def expert_outputs(layer: RoutedLayer, x_ND: Tensor) -> Tensor:
    """[E, N, D]: every expert of `layer` applied to the same inputs x [N, D] (no gate)."""
    experts = layer.experts
    return torch.stack([experts.expert_forward(e, x_ND) for e in range(experts.num_experts)])


def expert_cka(model: RoutedModel, batches: Sequence[Batch], *, max_tokens: int = 2048) -> np.ndarray:
    """Linear CKA between the experts of each MoE layer on shared probe inputs, [L, E, E].

    Symmetric, unit diagonal, in [0, 1]; nan rows for an expert whose outputs do not vary.
    """
    inputs = capture_layer_inputs(model, batches, max_tokens)
    mats = []
    for layer, x in zip(model.moe_layers, inputs):
        outs = expert_outputs(layer, x).double().cpu().numpy()
        mats.append(cka_matrix(list(outs)))
    return np.stack(mats)


def mean_offdiagonal(matrix: np.ndarray) -> float:
    """Mean of the finite off-diagonal entries of a square matrix [E, E] (nan if none)."""
    m = np.asarray(matrix, dtype=np.float64)
    off = m[~np.eye(m.shape[0], dtype=bool)]
    off = off[np.isfinite(off)]
    return float(off.mean()) if off.size else float("nan")
