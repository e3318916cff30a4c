"""The training app's structured config: one schema, registered with Hydra so that a misspelt key
or a wrongly typed value fails at composition. Defaults a user turns live in `conf/`; the
dataclass defaults here are the fallbacks the YAML files override."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe.balance import ADAPTIVE_SCOPES, BALANCE_SCOPES, BalanceConfig
from moe.data import DataConfig
from moe.data.config import validate as validate_data
from moe.layer import BACKENDS
from moe.model import ModelConfig, dense_twin
from moe.parallel import ParallelConfig
from moe.routers import RouterConfig, resolve_router_config, router_kinds, router_spec
from moe.sizing import TWIN_MATCHES
from moe.validation import check_choice

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainerConfig:
    """Optimization and bookkeeping (Hydra group `trainer`)."""

    # 250 x 16 x 256 = 1.0M tokens: the main job (moe-train with defaults) takes ~6.5 minutes on a
    # 2-core CPU, and at this budget the default MoE is below its active-matched twin on all four
    # built-in domains (by 0.09-0.25 nats; with 800 steps, the earlier default, the twin had caught
    # up on math).
    max_steps: int = 250
    micro_batch_size: int = 16  # sequences per rank per micro-step
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 25
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    threads: int | None = None  # torch CPU threads; null = torch's default
    # Keep freed CPU buffers for the next step instead of returning them to the OS (glibc only;
    # see moe/host_memory.py): the MoE's T*k-row buffers otherwise page-fault in afresh each step.
    retain_host_memory: bool = True
    log_every: int = 10
    eval_every: int = 250  # per-domain validation loss every N steps (and at the end)
    eval_batch_size: int = 16
    checkpoint_every: int = 125
    keep_last: int = 2
    # Seconds a rank waits for the others in one collective (gradient all-reduce, barrier) before the
    # job stops naming the rank that stopped answering. Far above any step time, far below gloo's
    # and NCCL's 30-minute defaults, which leave a job with a stalled rank hanging that long.
    dist_timeout_s: float = 600.0
    tensorboard: bool = True
    progress: bool = True  # tqdm bar
    # The layout over the ranks of a torchrun launch: DDP, FSDP2, expert parallelism (moe/parallel.py).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


@dataclass
class TwinConfig:
    """Dense twins trained beside the MoE on the same data order, seed and token budget."""

    match: list[str] = field(default_factory=lambda: ["active"])  # subset of: active, total
    # Train the twins without the MoE: a sweep trains them once per (data, seed) in their own job
    # instead of beside every MoE variant (`moe-sweep` pairs them up again).
    only: bool = False


@dataclass
class BackendConfig:
    name: str = "native"  # native | megablocks (CUDA only)


@dataclass
class TrainConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    # The base class: composition merges the chosen kind's config class into it (conf/router/).
    router: RouterConfig = field(default_factory=RouterConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    twin: TwinConfig = field(default_factory=TwinConfig)
    # Analyze the trained MoE (and twins) into <run_dir>/analysis when training ends.
    analyze: bool = True


def register_configs() -> None:
    """The schema of conf/train.yaml, and one `<kind>_schema` per registered router in group
    `router` (conf/router/<kind>.yaml selects it), so each router's own fields are type-checked at
    composition."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for kind in router_kinds():
        store.store(group="router", name=f"{kind}_schema", node=router_spec(kind).config(kind=kind))


def to_train_config(cfg: DictConfig | TrainConfig, *, stored: bool = False) -> TrainConfig:
    """A validated TrainConfig object from a composed Hydra config, or with `stored=True` from a
    run's saved config.yaml (whose router section may hold fields of the flat router config of
    earlier versions that its kind never read: they are dropped). The router section becomes its
    kind's own config class (`moe.routers`)."""
    if isinstance(cfg, DictConfig):
        router = config_dict(cfg.router, resolve=True) if "router" in cfg else {}
        rest = OmegaConf.masked_copy(cfg, [str(key) for key in cfg if key != "router"])
        reject_unknown_keys(rest, TrainConfig)
        router_cfg = resolve_router_config(router, stored=stored)
        train_cfg = config_object(TrainConfig, OmegaConf.merge(OmegaConf.structured(TrainConfig), rest))
        train_cfg.router = router_cfg
    else:
        train_cfg = cfg
        train_cfg.router = resolve_router_config(cfg.router)
    validate(train_cfg)
    return train_cfg


T = TypeVar("T")


def config_object(schema: type[T], cfg: Any) -> T:
    """`OmegaConf.to_object` of a config built on the dataclass `schema`, typed as one (OmegaConf's
    return type covers every kind of node); TypeError when it is something else."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, schema):
        raise TypeError(f"the config is a {type(obj).__name__}, not a {schema.__name__}")
    return obj


def config_dict(cfg: Any, *, resolve: bool = False) -> dict[str, Any]:
    """`OmegaConf.to_container` of a mapping node (a loaded YAML file, a config section) as a dict;
    TypeError for a list or a scalar."""
    data = OmegaConf.to_container(cfg, resolve=resolve)
    if not isinstance(data, dict):
        raise TypeError(f"expected a mapping, got a {type(data).__name__}")
    return cast(dict[str, Any], data)  # OmegaConf types keys as any DictKeyType; config keys are str


def _schema_of(hint: Any) -> Any:
    """`hint` without Optional[...]: a dataclass, a Dict[...] or anything else."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def unknown_keys(node: Any, schema: Any, prefix: str = "") -> Iterator[tuple[str, list[str]]]:
    """(dotted key, the valid names at its level) for every key of the plain dict `node` that the
    dataclass `schema` does not have, at any depth (into dict-valued fields too)."""
    schema = _schema_of(schema)
    if not isinstance(node, dict):
        return
    if dataclasses.is_dataclass(schema):
        hints = typing.get_type_hints(schema)
        for key, value in node.items():
            if key in hints:
                yield from unknown_keys(value, hints[key], f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", list(hints)
    elif typing.get_origin(schema) is dict:
        value_schema = typing.get_args(schema)[1]
        for key, value in node.items():
            yield from unknown_keys(value, value_schema, f"{prefix}{key}.")


def reject_unknown_keys(cfg: DictConfig, schema: type) -> None:
    """ValueError for a key the schema lacks, naming it and the closest valid key. Hydra accepts
    any key added with `+` (`+trainer.max_stepz=5`), and the merge onto the schema then keeps it
    as a stray attribute: the setting would be silently ignored."""
    plain = OmegaConf.to_container(cfg, resolve=False)  # keys only: interpolations stay unresolved
    for key, names in unknown_keys(plain, schema):
        parent, _, leaf = key.rpartition(".")
        close = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
        hint = (
            f"did you mean {parent + '.' if parent else ''}{close[0]}?"
            if close
            else f"valid keys there: {', '.join(sorted(names))}"
        )
        raise ValueError(
            f"unknown config key {key!r} ({hint}). Fix the name; a key added with '+' must still be "
            "one the schema defines (see conf/ and moe/config.py)."
        )


def validate(cfg: TrainConfig) -> None:
    """Check ranges and cross-field rules that a schema cannot express, at composition (before any
    data or run-directory work); messages name the field and the fix."""
    cfg.model.validate()
    validate_data(cfg.data)
    router = router_spec(cfg.router.kind)  # ValueError naming the registered kinds
    cfg.router.validate()
    if cfg.balance.scope not in BALANCE_SCOPES:
        check_choice("balance.scope", cfg.balance.scope, BALANCE_SCOPES)
    finite = math.isfinite
    m, t = cfg.model, cfg.trainer
    for name, value, ok, want in (
        ("seed", cfg.seed, cfg.seed >= 0, "an integer >= 0"),
        ("model.rope_theta", m.rope_theta, finite(m.rope_theta) and m.rope_theta > 0, "a finite number > 0"),
        ("model.init_std", m.init_std, finite(m.init_std) and m.init_std > 0, "a finite number > 0"),
        ("model.dense_width", m.dense_width, m.dense_width is None or m.dense_width >= 1, ">= 1, or null"),
        (
            "balance.lbl_coef",
            cfg.balance.lbl_coef,
            finite(cfg.balance.lbl_coef) and cfg.balance.lbl_coef >= 0,
            "a finite number >= 0",
        ),
        (
            "balance.z_coef",
            cfg.balance.z_coef,
            finite(cfg.balance.z_coef) and cfg.balance.z_coef >= 0,
            "a finite number >= 0",
        ),
        ("trainer.threads", t.threads, t.threads is None or t.threads >= 1, ">= 1, or null for torch's default"),
        (
            "trainer.dist_timeout_s",
            t.dist_timeout_s,
            finite(t.dist_timeout_s) and t.dist_timeout_s > 0,
            "a finite number of seconds > 0",
        ),
    ):
        if not ok:  # also catches nan: every comparison with it is False
            raise ValueError(f"{name}={value} is out of range: it must be {want}")
    for name in (
        "max_steps",
        "micro_batch_size",
        "grad_accum_steps",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_last",
        "eval_batch_size",
    ):
        if getattr(t, name) < 1:
            raise ValueError(f"trainer.{name} must be >= 1, got {getattr(t, name)}")
    for name, value, ok, want in (
        ("lr", t.lr, 0 < t.lr < float("inf"), "a finite number > 0"),
        ("min_lr_ratio", t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
        ("warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("weight_decay", t.weight_decay, 0 <= t.weight_decay < float("inf"), "a finite number >= 0"),
        ("beta1", t.beta1, 0 <= t.beta1 < 1, "in [0, 1)"),
        ("beta2", t.beta2, 0 <= t.beta2 < 1, "in [0, 1)"),
        ("grad_clip", t.grad_clip, 0 <= t.grad_clip < float("inf"), ">= 0 (0 = off)"),
    ):
        if not ok:  # also catches nan: every comparison with it is False
            raise ValueError(f"trainer.{name}={value} is out of range: it must be {want}")
    if t.precision not in PRECISIONS:
        check_choice("trainer.precision", t.precision, PRECISIONS)
    t.parallel.validate()
    if cfg.backend.name not in BACKENDS:
        check_choice("backend.name", cfg.backend.name, BACKENDS)
    for match in cfg.twin.match:
        if match not in TWIN_MATCHES:
            raise ValueError(f"twin.match contains {match!r}; allowed values: {', '.join(TWIN_MATCHES)}")
    if cfg.backend.name == "megablocks" and (t.device == "cpu" or t.precision == "fp32"):
        raise ValueError(
            "backend=megablocks runs MegaBlocks' bf16 grouped GEMM on CUDA; got trainer.device="
            f"{t.device!r}, trainer.precision={t.precision!r}. Use trainer.device=cuda (or auto) and "
            "trainer.precision=bf16 (or auto), or backend=native"
        )
    if cfg.twin.only and (cfg.model.ffn != "moe" or not cfg.twin.match):
        raise ValueError(
            "twin.only=true trains the dense twins of an MoE model without it; it needs model.ffn=moe "
            f"and a non-empty twin.match (got ffn={cfg.model.ffn!r}, match={list(cfg.twin.match)})"
        )
    if cfg.balance.scope in ADAPTIVE_SCOPES and cfg.model.ffn == "moe" and not router.adapts_to_load:
        adaptive = [kind for kind in router_kinds() if router_spec(kind).adapts_to_load]
        raise ValueError(
            f"balance={cfg.balance.scope} balances by letting the router adapt to the load (a selection "
            f"bias), which router={cfg.router.kind} does not do; routers that do: "
            f"{', '.join(f'router={k}' for k in adaptive)}. "
            "Use one of those or another balance scope."
        )


def models_to_train(cfg: TrainConfig) -> list[tuple[str, ModelConfig]]:
    """(name, ModelConfig) of every model of the experiment, the MoE first; the names are the
    directories under <run_dir>/models/."""
    if cfg.model.ffn == "dense":
        return [("dense", cfg.model)]
    twins = [(f"dense_{match}", dense_twin(cfg.model, match)) for match in cfg.twin.match]
    return twins if cfg.twin.only else [("moe", cfg.model)] + twins


def as_plain_dict(cfg: Any) -> dict[str, Any]:
    """Any config dataclass (TrainConfig, ModelConfig, ...) as plain, YAML/JSON-ready data."""
    return config_dict(OmegaConf.structured(cfg), resolve=True)
