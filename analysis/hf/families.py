"""The supported `transformers` MoE families: where their MoE blocks are, how they route, and what
they run besides the routed experts.

Keyed by `config.model_type`. Every family keeps its decoder layers in `model.model.layers`; a layer
is an MoE layer when its MLP (`mlp`, or `block_sparse_moe` in transformers 4.x Mixtral) has both a
`gate` and `experts` (dense layers: DeepSeek's and GLM-4-MoE's first `first_k_dense_replace` layers,
Qwen-MoE's `mlp_only_layers` and `decoder_sparse_step`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from analysis.hf.rules import GroupLimitedSoftmax, RoutingRule, SigmoidGroupTopK, SoftmaxTopK

__all__ = ["FAMILIES", "Family", "decoder_layers", "family_of", "module_attr", "moe_blocks", "tensor_attr"]

_MLP_ATTRS = ("mlp", "block_sparse_moe")


@dataclass(frozen=True)
class Family:
    """name: as papers call it; rule(config) -> RoutingRule; shared(config) -> a sentence on the
    experts every token uses besides its routed ones (None: none)."""

    name: str
    rule: Callable[[Any], RoutingRule]
    shared: Callable[[Any], str | None]


def _no_shared(config: Any) -> None:
    return None


def _qwen2_shared(config: Any) -> str:
    return (
        f"1 shared expert (width {config.shared_expert_intermediate_size}) on every token, scaled per "
        "token by sigmoid(shared_expert_gate x); not routed, not knocked out"
    )


def _deepseek_shared(config: Any) -> str | None:
    n = getattr(config, "n_shared_experts", 0) or 0
    if not n:
        return None
    return (
        f"{n} shared expert(s) (width {config.moe_intermediate_size} each) on every token, ungated; "
        "not routed, not knocked out"
    )


def _sigmoid_group_topk(c: Any) -> RoutingRule:
    return SigmoidGroupTopK(
        top_k=c.num_experts_per_tok,
        n_group=c.n_group,
        topk_group=c.topk_group,
        normalize=bool(c.norm_topk_prob),
        scale=float(c.routed_scaling_factor),
    )


def _softmax(normalize: Callable[[Any], bool]) -> Callable[[Any], RoutingRule]:
    return lambda c: SoftmaxTopK(top_k=c.num_experts_per_tok, normalize=bool(normalize(c)))


FAMILIES: dict[str, Family] = {
    "mixtral": Family("Mixtral", _softmax(lambda c: True), _no_shared),
    "olmoe": Family("OLMoE", _softmax(lambda c: c.norm_topk_prob), _no_shared),
    "qwen2_moe": Family("Qwen2-MoE", _softmax(lambda c: c.norm_topk_prob), _qwen2_shared),
    "qwen3_moe": Family("Qwen3-MoE", _softmax(lambda c: c.norm_topk_prob), _no_shared),
    "deepseek_v2": Family(
        "DeepSeek-V2",
        lambda c: GroupLimitedSoftmax(
            top_k=c.num_experts_per_tok,
            method=c.topk_method or "greedy",
            n_group=c.n_group,
            topk_group=c.topk_group,
            scale=float(c.routed_scaling_factor),
        ),
        _deepseek_shared,
    ),
    "deepseek_v3": Family("DeepSeek-V3", _sigmoid_group_topk, _deepseek_shared),
    # GLM-4.5: DeepSeek-V3's gate with ordinary attention; what a router=sigmoid model exports to.
    "glm4_moe": Family("GLM-4-MoE", _sigmoid_group_topk, _deepseek_shared),
}


def family_of(config: Any) -> Family:
    """The family of a transformers config; ValueError naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not a supported MoE family; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (`model.model.layers`)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no `model.layers`; not a supported decoder-only MoE model")
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}'s `model.layers` is a {type(layers).__name__}, not a ModuleList")
    return layers


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module | None]]:
    """(decoder layer index, its MoE block or None for a dense layer) for every decoder layer."""
    out: list[tuple[int, nn.Module | None]] = []
    for i, layer in enumerate(decoder_layers(model)):
        block = None
        for attr in _MLP_ATTRS:
            mlp = getattr(layer, attr, None)
            if mlp is not None and hasattr(mlp, "gate") and hasattr(mlp, "experts"):
                block = mlp
                break
        out.append((i, block))
    return out


def module_attr(owner: nn.Module, name: str) -> nn.Module:
    """`owner.<name>`, a submodule of a transformers module (TypeError naming it otherwise)."""
    value = getattr(owner, name)
    if not isinstance(value, nn.Module):
        raise TypeError(f"{type(owner).__name__}.{name} is a {type(value).__name__}, not a module")
    return value


def tensor_attr(owner: nn.Module, name: str) -> Tensor:
    """`owner.<name>`, a parameter or buffer of a transformers module (TypeError naming it otherwise)."""
    value = getattr(owner, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(owner).__name__}.{name} is a {type(value).__name__}, not a tensor")
    return value
