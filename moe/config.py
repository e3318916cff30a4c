"""The training app's structured config: one schema, registered with Hydra so that a misspelt key
or a wrongly typed value fails at composition. Defaults a user turns live in `conf/`; the
dataclass defaults here are the fallbacks the YAML files override."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe.balance import BalanceConfig
from moe.data import DataConfig
from moe.layer import BACKENDS
from moe.model import ModelConfig
from moe.routing import RouterConfig
from moe.sizing import TWIN_MATCHES

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainerConfig:
    """Optimization and bookkeeping (Hydra group `trainer`)."""

    # 800 x 16 x 256 = 3.3M tokens: at this budget the default MoE leads its active-matched twin
    # on all four built-in domains (at 300 steps it still trails; at 600 it leads by ~0.005 nats).
    max_steps: int = 800
    micro_batch_size: int = 16  # sequences per rank per micro-step
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 60
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    threads: Optional[int] = None  # torch CPU threads; null = torch's default
    # Keep freed CPU buffers for the next step instead of returning them to the OS (glibc only;
    # see moe/host_memory.py): the MoE's T*k-row buffers otherwise page-fault in afresh each step.
    retain_host_memory: bool = True
    log_every: int = 10
    eval_every: int = 400  # per-domain validation loss every N steps (and at the end)
    eval_batch_size: int = 16
    checkpoint_every: int = 400
    keep_last: int = 2
    tensorboard: bool = True
    progress: bool = True  # tqdm bar


@dataclass
class TwinConfig:
    """Dense twins trained beside the MoE on the same data order, seed and token budget."""

    match: List[str] = field(default_factory=lambda: ["active"])  # subset of: active, total
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
    router: RouterConfig = field(default_factory=RouterConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    twin: TwinConfig = field(default_factory=TwinConfig)
    # Analyze the trained MoE (and twins) into <run_dir>/analysis when training ends.
    analyze: bool = True


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_train_config(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """A validated TrainConfig object from a composed Hydra config."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Check cross-field rules that a schema cannot express; messages name field and fix."""
    cfg.model.validate()
    t = cfg.trainer
    for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every", "eval_every",
                 "checkpoint_every", "keep_last", "eval_batch_size"):
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
    if not 0 <= cfg.router.jitter < 1:
        raise ValueError(f"router.jitter={cfg.router.jitter} is out of range: it must be in [0, 1) (logits are "
                         "scaled by a factor drawn from [1 - jitter, 1 + jitter])")
    if t.precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={t.precision!r} is unknown; allowed values: {', '.join(PRECISIONS)}")
    if cfg.backend.name not in BACKENDS:
        raise ValueError(f"backend.name={cfg.backend.name!r} is unknown; allowed values: {', '.join(BACKENDS)}")
    for match in cfg.twin.match:
        if match not in TWIN_MATCHES:
            raise ValueError(f"twin.match contains {match!r}; allowed values: {', '.join(TWIN_MATCHES)}")
    if cfg.backend.name == "megablocks" and (t.device == "cpu" or t.precision == "fp32"):
        raise ValueError("backend=megablocks runs MegaBlocks' bf16 grouped GEMM on CUDA; got trainer.device="
                         f"{t.device!r}, trainer.precision={t.precision!r}. Use trainer.device=cuda (or auto) and "
                         "trainer.precision=bf16 (or auto), or backend=native")
    if cfg.twin.only and (cfg.model.ffn != "moe" or not cfg.twin.match):
        raise ValueError("twin.only=true trains the dense twins of an MoE model without it; it needs model.ffn=moe "
                         f"and a non-empty twin.match (got ffn={cfg.model.ffn!r}, match={list(cfg.twin.match)})")
    if cfg.balance.scope == "aux_free" and cfg.model.ffn == "moe" and cfg.router.kind != "sigmoid":
        raise ValueError("balance=aux_free nudges a selection bias that only router=sigmoid has; "
                         f"got router.kind={cfg.router.kind!r}. Use router=sigmoid or another balance scope.")


def as_plain_dict(cfg: Any) -> dict[str, Any]:
    """Any config dataclass (TrainConfig, ModelConfig, ...) as plain, YAML/JSON-ready data."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
