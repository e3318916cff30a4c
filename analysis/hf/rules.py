"""Routing rules of pretrained MoE families, reproduced op for op from the `transformers` gates.

Legend (as in `moe/`): T tokens, D model dim, E routed experts, K experts per token, G expert groups.

A rule turns a gate's input x [T, D] into router logits [T, E] (`logits`) and the logits into the
gate's decision (`select`): experts [T, K] and their combine weights [T, K], with the operations,
flags and float32 arithmetic of the gate in transformers 5.x, so that with no expert masked it
returns the gate's own output bit for bit (the adapter checks this on each layer's first call and
the tests check it per family). The cast of the weights to the gate's output dtype is left to the
caller, which sees that dtype (it changed between transformers releases).

Knockouts pass `mask` [E] bool (False = knocked out). The masked expert is removed from the final
top-k choice only: its score becomes -inf there, and everything else (softmax denominators, the
groups DeepSeek routes within, weights) is the intact model's. A token that did not select the
expert therefore keeps exactly its routing, and a token that did gets its next choice within the
same groups, with that expert's own weight (renormalized over the new top-k where the family
renormalizes). Masking before the group choice instead would also move tokens that never used the
expert (DeepSeek-V3 scores a group by its two best experts, so removing one can drop its group). For softmax
gates that renormalize (Mixtral, Qwen3-MoE) this equals masking the logit before the softmax; for
those that do not (OLMoE, Qwen1.5-MoE, DeepSeek-V2) masking the logit would rescale every token's
weights by 1 / (1 - p_e), a global change that is not the expert's removal.

`probs` [T, E] is the router distribution of the record: the softmax of the logits (softmax gates)
or the sigmoid scores normalized over experts (DeepSeek-V3, as `moe.routing.SigmoidBiasRouter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GroupLimitedSoftmax", "RuleOutput", "RoutingRule", "SigmoidGroupTopK", "SoftmaxTopK"]


@dataclass(frozen=True)
class RuleOutput:
    """indices [T, K] int64; weights [T, K] float32 (the gate's combine weights, incl. any scaling);
    probs [T, E] float32."""

    indices: Tensor
    weights: Tensor
    probs: Tensor


def _gate_weight(gate: nn.Module) -> Tensor:
    weight = getattr(gate, "weight", None)
    if weight is None:
        raise TypeError(f"gate {type(gate).__name__} has no `weight` [E, D]; cannot compute its logits")
    return weight


def _masked(scores: Tensor, mask: Tensor | None) -> Tensor:
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def _group_mask(scores_TE: Tensor, group_scores_TG: Tensor, topk_group: int) -> Tensor:
    """[T, E] bool: True for the experts of each token's `topk_group` best groups."""
    t, g = group_scores_TG.shape
    group_idx = torch.topk(group_scores_TG, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores_TG).scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(t, g, scores_TE.shape[-1] // g).reshape(t, -1).bool()


@dataclass(frozen=True)
class SoftmaxTopK:
    """Mixtral, OLMoE, Qwen2-MoE (Qwen1.5-MoE), Qwen3-MoE.

    logits = x W^T in the model's dtype; p = softmax(logits) in float32; the K largest p are the
    experts and their p the weights, divided by their sum when `normalize` (Mixtral always;
    the others' `norm_topk_prob`: False for OLMoE-1B-7B and Qwen1.5-MoE, True for Qwen3-MoE).
    """

    top_k: int
    normalize: bool

    def logits(self, gate: nn.Module, x_TD: Tensor) -> Tensor:
        return F.linear(x_TD, _gate_weight(gate))

    def select(self, logits_TE: Tensor, mask: Tensor | None = None, gate: nn.Module | None = None) -> RuleOutput:
        probs = torch.softmax(logits_TE.float(), dim=-1)
        weights, indices = torch.topk(_masked(probs, mask), self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RuleOutput(indices, weights, probs)

    def describe(self) -> str:
        norm = "renormalized over the top-k" if self.normalize else "not renormalized"
        return f"softmax -> top-{self.top_k}, weights {norm}"


@dataclass(frozen=True)
class GroupLimitedSoftmax:
    """DeepSeek-V2 (as transformers implements it).

    logits = x W^T in float32; s = softmax(logits); `greedy`: top-K of s; `group_limited_greedy`:
    the E experts form G groups, a group scores the max s of its experts, and the top-K are taken
    among the experts of the `topk_group` best groups (the others' s set to 0). Weights = s of the
    chosen experts times `routed_scaling_factor`, never renormalized (transformers' port ignores
    the config's `norm_topk_prob`, which the released DeepSeek-V2 checkpoints set to false).
    """

    top_k: int
    method: str  # greedy | group_limited_greedy
    n_group: int | None
    topk_group: int | None
    scale: float

    def __post_init__(self) -> None:
        if self.method not in ("greedy", "group_limited_greedy"):
            raise ValueError(
                f"DeepSeek-V2 topk_method={self.method!r} is not supported; known: greedy, group_limited_greedy"
            )

    def logits(self, gate: nn.Module, x_TD: Tensor) -> Tensor:
        return F.linear(x_TD.type(torch.float32), _gate_weight(gate).type(torch.float32))

    def select(self, logits_TE: Tensor, mask: Tensor | None = None, gate: nn.Module | None = None) -> RuleOutput:
        probs = logits_TE.softmax(dim=-1, dtype=torch.float32)
        scores = probs
        if self.method == "group_limited_greedy":
            n_group, topk_group = self.n_group, self.topk_group
            if n_group is None or topk_group is None:
                raise ValueError("DeepSeek-V2 topk_method=group_limited_greedy needs n_group and topk_group")
            e = scores.shape[-1]
            group_scores = scores.view(-1, n_group, e // n_group).max(dim=-1).values
            scores = scores.masked_fill(~_group_mask(scores, group_scores, topk_group), 0.0)
        weights, indices = torch.topk(_masked(scores, mask), k=self.top_k, dim=-1, sorted=False)
        return RuleOutput(indices, weights * self.scale, probs)

    def describe(self) -> str:
        groups = (
            f", limited to the best {self.topk_group} of {self.n_group} groups (group score = max)"
            if self.method == "group_limited_greedy"
            else ""
        )
        return f"softmax -> top-{self.top_k}{groups}, weights x {self.scale:g}, not renormalized"


@dataclass(frozen=True)
class SigmoidGroupTopK:
    """DeepSeek-V3 (aux-loss-free balancing, `noaux_tc`); GLM-4-MoE's gate is the same.

    logits = x W^T in float32; s = sigmoid(logits); selection uses s + b (b = the gate's
    `e_score_correction_bias`, read at each call): the E experts form G groups, a group scores the
    sum of its two largest s + b, and the top-K of s + b are taken among the experts of the
    `topk_group` best groups. Weights = s (not s + b) of the chosen experts, divided by their sum
    (+1e-20) when `normalize` (`norm_topk_prob`), times `routed_scaling_factor`.
    """

    top_k: int
    n_group: int
    topk_group: int
    normalize: bool
    scale: float

    def logits(self, gate: nn.Module, x_TD: Tensor) -> Tensor:
        return F.linear(x_TD.type(torch.float32), _gate_weight(gate).type(torch.float32))

    def select(self, logits_TE: Tensor, mask: Tensor | None = None, gate: nn.Module | None = None) -> RuleOutput:
        scores = logits_TE.sigmoid()
        bias = getattr(gate, "e_score_correction_bias", None) if gate is not None else None
        choice = scores if bias is None else scores + bias
        e = choice.shape[-1]
        group_scores = choice.view(-1, self.n_group, e // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~_group_mask(choice, group_scores, self.topk_group), float("-inf"))
        indices = torch.topk(_masked(choice, mask), k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        probs = scores / scores.sum(dim=-1, keepdim=True)
        return RuleOutput(indices, weights * self.scale, probs)

    def describe(self) -> str:
        norm = "renormalized over the top-k" if self.normalize else "not renormalized"
        return (
            f"sigmoid scores + correction bias -> top-{self.top_k} within the best {self.topk_group} of "
            f"{self.n_group} groups (group score = sum of its top-2), weights = scores {norm}, x {self.scale:g}"
        )


RoutingRule = SoftmaxTopK | GroupLimitedSoftmax | SigmoidGroupTopK
