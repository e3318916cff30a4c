"""The interface the analysis reads: a routed language model and its routed layers.

Three implementations: `moe.model.LanguageModel` (its `moe.layer.MoELayer`s, either experts backend)
and `analysis.hf.adapter.HFMoEModel` (its `HFMoELayer`s, a Hugging Face MoE behind hooks). The
analysis (recorder, knockouts, probes, sizing) annotates these protocols, never a concrete class,
so a fourth implementation needs no change there. Shapes follow the legend of `moe/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor
from torch.nn import Parameter

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from moe.model import LMOutput


@runtime_checkable
class RouterLike(Protocol):
    """What a layer's router exposes: it returns one `Routing` per forward (forward hooks on it see,
    and may replace, that record) and holds the knockout mask (True = expert available)."""

    expert_mask: Tensor  # [E] bool
    num_experts: int
    top_k: int

    def register_forward_hook(self, hook: Callable[..., Any]) -> RemovableHandle: ...


@runtime_checkable
class ExpertBank(Protocol):
    """The routed experts of one layer, each callable on its own."""

    @property
    def num_experts(self) -> int: ...

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Expert `expert` applied to N rows x_ND [N, D] -> [N, D] (no gate weight)."""
        ...


@runtime_checkable
class RoutedLayer(Protocol):
    """One MoE layer: its router, its experts, and a pre-hook on the layer input (the hidden
    state both the router and the experts receive)."""

    @property
    def router(self) -> RouterLike: ...

    @property
    def experts(self) -> ExpertBank: ...

    def register_forward_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle: ...


class Block(Protocol):
    @property
    def is_moe(self) -> bool:
        """The block's feed-forward is a routed layer."""
        ...


class Blocks(Protocol):
    """The blocks of a model in depth order (a list, an nn.ModuleList)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Block]: ...

    def __getitem__(self, index: int) -> Block: ...


@runtime_checkable
class RoutedModel(Protocol):
    """A causal LM whose MoE layers the analysis can record, knock out and probe."""

    vocab_size: int
    training: bool  # as nn.Module: the analysis switches the model to eval mode and back

    @property
    def moe_layers(self) -> Sequence[RoutedLayer]:
        """The routed layers in depth order (one per MoE block)."""
        ...

    @property
    def blocks(self) -> Blocks: ...

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def __call__(
        self, tokens_BS: Tensor, targets_BS: Tensor | None = None, domain_BS: Tensor | None = None
    ) -> LMOutput: ...


def moe_block_indices(model: RoutedModel) -> list[int]:
    """Depth indices of the blocks whose feed-forward is routed, in order; ValueError when there is
    none (a dense model has nothing to record or knock out)."""
    blocks = [i for i, block in enumerate(model.blocks) if block.is_moe]
    if not blocks:
        raise ValueError("the model has no MoE layer: nothing to record or knock out (is it a dense twin?)")
    return blocks


__all__ = ["Block", "Blocks", "ExpertBank", "RoutedLayer", "RoutedModel", "RouterLike", "moe_block_indices"]
