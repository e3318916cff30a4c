"""Load balancing: the auxiliary loss in its three scopes, the router z-loss, and when routers
adapt to the load (the aux-loss-free scope, DeepSeek-V3).

The trainer owns one `LoadBalancer`; it is the only state balancing needs (no module-level
lists). Per micro-step: `aux_losses(routings, seq_len)`. Per optimizer step: `end_step()`, which
returns the step's expert loads ([L, E] selected assignments, `Routing.selected_counts`) and resets
the gradient-accumulation buffer; then, where `adapts_routers`, each router's `after_step(load)`
(the sigmoid router moves its selection bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moe.loads import max_violation as numpy_max_violation
from moe.routing import Routing
from moe.validation import check_choice

BALANCE_SCOPES = ("micro_batch", "sequence", "global_batch", "aux_free", "none")
# Scopes that balance by letting routers adapt to the load (`Router.after_step`), not by a loss;
# they need a router registered with `adapts_to_load`.
ADAPTIVE_SCOPES = ("aux_free",)


@dataclass
class BalanceConfig:
    """How experts are kept busy (Hydra group `balance`)."""

    # micro_batch | sequence | global_batch: where the load-balancing loss counts expert use.
    # aux_free: no loss; a selection bias is nudged toward balance after each optimizer step.
    # none: no balancing at all.
    scope: str = "micro_batch"
    lbl_coef: float = 0.01
    z_coef: float = 0.001


def load_balancing_loss(
    probs_TE: Tensor,
    indices_TK: Tensor,
    num_experts: int,
    counts_E: Tensor | None = None,
    num_tokens: float | None = None,
) -> Tensor:
    """Switch/GShard auxiliary loss in MegaBlocks' normalization:
    `E/(k*T) * sum_e count_e * mean_t p[t,e]`, which is 1.0 at perfect balance (uniform probs and
    equal counts) and grows with imbalance (at most E when everything goes to one expert).

    Hugging Face's Mixtral `load_balancing_loss_func` scores k at perfect balance instead of 1
    (it does not divide the counts by k); multiply ours by k to compare.

    Args:
        probs_TE: [T, E] router probabilities of the local tokens (carry the gradient).
        indices_TK: [T, K] selected experts; their counts carry no gradient.
        counts_E: optional [E] counts to use instead of the local ones (the global-batch scope
            passes counts summed over ranks and accumulation steps).
        num_tokens: the number of tokens behind `counts_E` (defaults to T).
    Returns: scalar float32 tensor.
    """
    top_k = indices_TK.shape[-1]
    if counts_E is None:
        counts_E = torch.bincount(indices_TK.reshape(-1), minlength=num_experts)
        num_tokens = probs_TE.shape[0]
    elif num_tokens is None:
        num_tokens = float(counts_E.sum()) / top_k
    fraction_E = counts_E.to(probs_TE.dtype) / (top_k * num_tokens)
    return num_experts * torch.sum(fraction_E * probs_TE.mean(dim=0))


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss `mean_t (logsumexp_e logits[t,e])^2` (float32 scalar)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def max_violation(counts_E: Tensor) -> float:
    """MaxVio of the expert loads counts [E]: `moe.loads.max_violation` (the one definition, shared
    with the analysis), on the host. nan when every count is 0."""
    return numpy_max_violation(counts_E.detach().double().cpu().numpy())


@dataclass(frozen=True)
class AuxLosses:
    """Balancing terms of one micro-step, each averaged over MoE layers (float32 scalars)."""

    lbl: Tensor
    z: Tensor
    total: Tensor  # lbl_coef * lbl + z_coef * z, the term added to the LM loss


class LoadBalancer:
    """Computes the auxiliary losses in the configured scope and tracks expert loads per step.

    `global_batch` scope (Qiu et al. 2025, "Demons in the Detail"): the expert counts, which carry
    no gradient, are all-reduced over the data-parallel group and accumulated over the
    gradient-accumulation micro-steps of one optimizer step; the probabilities stay local, so the
    gradient keeps its form. The accumulation buffer resets in `end_step`.
    """

    def __init__(self, cfg: BalanceConfig, num_experts: int, process_group: dist.ProcessGroup | None = None):
        if cfg.scope not in BALANCE_SCOPES:
            check_choice("balance.scope", cfg.scope, BALANCE_SCOPES)
        for name in ("lbl_coef", "z_coef"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"balance.{name} must be >= 0, got {getattr(cfg, name)}")
        self.cfg = cfg
        self.num_experts = num_experts
        self.process_group = process_group
        self._step_counts: Tensor | None = None  # [L, E] counts this optimizer step (all ranks for global_batch)
        self._global_counts: Tensor | None = None  # [L, E] global-batch accumulation buffer

    @property
    def adapts_routers(self) -> bool:
        """Whether the routers' `after_step(load)` runs after each optimizer step: the aux-free
        scope balances through the routers (a selection bias) instead of a loss."""
        return self.cfg.scope in ADAPTIVE_SCOPES

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _all_reduce(self, counts: Tensor) -> Tensor:
        if self.distributed:
            counts = counts.clone()
            dist.all_reduce(counts, group=self.process_group)
        return counts

    def aux_losses(self, routings: list[Routing], seq_len: int) -> AuxLosses:
        """Balancing losses of one micro-step. `routings` holds one record per MoE layer, each over
        T = B * seq_len tokens in batch-major order."""
        if not routings:
            zero = torch.zeros(())
            return AuxLosses(zero, zero, zero)
        device = routings[0].probs.device
        local = torch.stack([r.selected_counts() for r in routings]).to(torch.float64)  # [L, E] loads
        self._step_counts = local if self._step_counts is None else self._step_counts + local

        z = torch.stack([router_z_loss(r.logits) for r in routings]).mean()
        scope = self.cfg.scope
        if scope in ("aux_free", "none") or self.cfg.lbl_coef == 0:
            lbl = torch.zeros((), device=device)
        elif scope == "micro_batch":
            lbl = torch.stack([load_balancing_loss(r.probs, r.indices, self.num_experts) for r in routings]).mean()
        elif scope == "sequence":
            lbl = torch.stack([self._sequence_loss(r, seq_len) for r in routings]).mean()
        else:  # global_batch
            reduced = self._all_reduce(local)
            self._global_counts = reduced if self._global_counts is None else self._global_counts + reduced
            top_k = routings[0].top_k
            lbl = torch.stack(
                [
                    load_balancing_loss(
                        r.probs, r.indices, self.num_experts, counts_E=c, num_tokens=float(c.sum()) / top_k
                    )
                    for r, c in zip(routings, self._global_counts)
                ]
            ).mean()
        total = self.cfg.lbl_coef * lbl + self.cfg.z_coef * z
        return AuxLosses(lbl.detach(), z.detach(), total)

    def _sequence_loss(self, routing: Routing, seq_len: int) -> Tensor:
        T, E = routing.probs.shape
        if T % seq_len:
            raise ValueError(f"sequence-scope balancing needs T={T} to be a multiple of seq_len={seq_len}")
        probs_BSE = routing.probs.view(-1, seq_len, E)
        indices_BSK = routing.indices.view(-1, seq_len, routing.top_k)
        return torch.stack([load_balancing_loss(p, i, E) for p, i in zip(probs_BSE, indices_BSK)]).mean()

    def end_step(self) -> Tensor | None:
        """Close one optimizer step: return its [L, E] expert loads summed over micro-steps and
        ranks (None if no MoE forward happened), and reset the accumulation buffers."""
        counts = (
            self._global_counts
            if self._global_counts is not None
            else (None if self._step_counts is None else self._all_reduce(self._step_counts))
        )
        self._step_counts = None
        self._global_counts = None
        return counts
