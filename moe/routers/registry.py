"""The router registry: router kind -> its config dataclass, its builder and what the rest of the
package needs to know about it. A new router is one module that calls `register_router` (and a
YAML file in conf/router/ selecting it); nothing else changes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from moe.routers.base import RouterConfig
from moe.validation import check_choice

ROLES = ("learned", "control")


@dataclass(frozen=True)
class RouterSpec:
    """One registered router.

    kind:            the name `router.kind` selects (and conf/router/<kind>.yaml).
    config:          its config dataclass (a `RouterConfig` subclass holding only the fields it reads).
    build:           (config, d_model, num_experts, top_k, capacity_factor) -> Router.
    role:            `learned` (a trained gate) or `control` (routing fixed by construction, whose
                     specialization is known: the sweep reports it as its own arm).
    adapts_to_load:  `Router.after_step(load)` changes its routing (balance=aux_free needs one).
    summary:         one line for listings and error messages.
    """

    kind: str
    config: type[RouterConfig]
    build: Callable[..., Any]
    role: str = "learned"
    adapts_to_load: bool = False
    summary: str = ""


_REGISTRY: dict[str, RouterSpec] = {}


def register_router(
    kind: str, config: type[RouterConfig], *, role: str = "learned", adapts_to_load: bool = False, summary: str = ""
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering `build(config, d_model, num_experts, top_k, capacity_factor) -> Router`
    as router `kind`. Registering a kind twice is an error (two modules would fight over it)."""
    if role not in ROLES:
        check_choice("role", role, ROLES)
    if not (dataclasses.is_dataclass(config) and issubclass(config, RouterConfig)):
        raise TypeError(f"router {kind!r}: config must be a RouterConfig dataclass, got {config!r}")

    def register(build: Callable[..., Any]) -> Callable[..., Any]:
        if kind in _REGISTRY:
            raise ValueError(f"router kind {kind!r} is registered twice")
        _REGISTRY[kind] = RouterSpec(kind, config, build, role, adapts_to_load, summary)
        return build

    return register


def router_kinds() -> tuple[str, ...]:
    """Every registered kind, in registration order."""
    return tuple(_REGISTRY)


def router_spec(kind: str) -> RouterSpec:
    """The spec of `kind`; ValueError naming the registered kinds otherwise."""
    check_choice("router.kind", kind, _REGISTRY)
    return _REGISTRY[kind]


def router_config(kind: str, **fields: Any) -> RouterConfig:
    """The config of router `kind` with `fields` set (the rest at their defaults); ValueError naming
    a field the kind does not have and the ones it has."""
    config = router_spec(kind).config
    names = [f.name for f in dataclasses.fields(config) if f.name != "kind"]
    for name in fields:
        if name not in names:
            raise ValueError(f"router {kind!r} has no field {name!r}; its fields: {', '.join(names) or 'none'}")
    return config(kind=kind, **fields)


# Fields of the single flat RouterConfig that every run stored before routers had their own configs:
# a stored config (config.yaml, a checkpoint) may carry them for a kind that never read them.
LEGACY_FIELDS = frozenset({"renormalize", "jitter", "bias_update_rate", "hash_seed"})


def resolve_router_config(cfg: RouterConfig | Mapping[str, Any], *, stored: bool = False) -> RouterConfig:
    """The kind's own config class for `cfg` (a `RouterConfig` of any class, or a mapping with
    `kind`). `stored=True` reads a saved config: legacy fields the kind does not have are dropped
    (they had no effect); otherwise such a field is an error."""
    values = dict(cfg) if isinstance(cfg, Mapping) else dataclasses.asdict(cfg)
    kind = values.pop("kind", RouterConfig.kind)
    spec = router_spec(kind)
    if isinstance(cfg, spec.config) and not isinstance(cfg, Mapping):
        return cfg
    names = {f.name for f in dataclasses.fields(spec.config)}
    if stored:
        values = {k: v for k, v in values.items() if k in names or k not in LEGACY_FIELDS}
    if not isinstance(cfg, Mapping):  # a base-class instance: its fields are the kind's too
        values = {k: v for k, v in values.items() if k in names}
    return router_config(kind, **values)
