"""Context managers that switch a module's mode and restore it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

__all__ = ["eval_mode"]


class HasMode(Protocol):
    """A module's train/eval switch (nn.Module, or a protocol of one such as `RoutedModel`)."""

    training: bool

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


M = TypeVar("M", bound=HasMode)


@contextmanager
def eval_mode(module: M) -> Iterator[M]:
    """Put `module` in eval mode for the block and restore its previous `training` flag on exit,
    also when the block raises. Yields the module.

    Restoring calls `module.train(flag)`, which sets every submodule to the module's own flag (as
    `nn.Module.train` does): submodules whose mode differed from their parent's are not kept apart.
    """
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
