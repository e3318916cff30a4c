"""Routers: score experts for each token and return one `moe.routing.Routing` record.

Each router kind lives in its own module of this package and registers itself (`register_router`)
with its config dataclass; `build_router` builds the kind a config names. Importing this package
imports every module in it, so a new router is one new file here (and its conf/router/ YAML). The
built-in kinds, in this order: topk, switch, expert_choice, sigmoid, and the controls hash, random,
prev_hash, domain.
"""

from __future__ import annotations

import importlib
import pkgutil

from moe.routers.base import LearnedRouter, LearnedRouterConfig, Router, RouterConfig
from moe.routers.registry import (
    RouterSpec,
    register_router,
    resolve_router_config,
    router_config,
    router_kinds,
    router_spec,
)

# The built-in routers register themselves on import, in this order (that of `router_kinds`); any
# other module of the package (a router a user added) after them. The order is kept from isort.
# isort: off
from moe.routers import topk, expert_choice, sigmoid, fixed  # noqa: F401
# isort: on

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_router(
    cfg: RouterConfig, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> Router:
    """The router `cfg.kind` names, built from its config (a base `RouterConfig` is completed with
    the kind's defaults), for `num_experts` experts, `top_k` per token."""
    cfg = resolve_router_config(cfg)
    cfg.validate()
    router = router_spec(cfg.kind).build(cfg, d_model, num_experts, top_k, capacity_factor)
    router.kind = cfg.kind
    return router


__all__ = [
    "LearnedRouter",
    "LearnedRouterConfig",
    "Router",
    "RouterConfig",
    "RouterSpec",
    "build_router",
    "register_router",
    "resolve_router_config",
    "router_config",
    "router_kinds",
    "router_spec",
]
