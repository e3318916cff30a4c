"""How one model is laid out over the ranks of a `torchrun` launch (`trainer.parallel`).

Three layouts, composable:
- data parallel (the default): every rank holds the whole model; DDP averages gradients.
- `fsdp=true`: FSDP2 (`fully_shard`) shards every block's parameters, gradients and optimizer
  state over all ranks; the blocks are gathered for their forward and backward only.
- `ep=N`: expert parallelism. The world is a 2-D mesh (dp = world/N, ep = N): each rank of an
  ep group holds E/N experts of every MoE layer (`moe.expert_parallel`) and tokens travel to them
  by all-to-all. The experts' gradients are summed over the ranks that hold the same experts (the
  dp dimension); every other parameter is data parallel (DDP, or FSDP2 with the experts left out).

Gradients mean the same at every layout: the loss of a step is the mean over all ranks of each
rank's token-mean loss, so every gradient is (1/world) * sum over ranks. DDP and FSDP2 average
over all ranks; a local expert's gradient arrives summed over its ep group by the all-to-all's
backward and is then summed over the dp dimension and divided by the world size here.

Checkpoints stay in the consolidated single-file layout (`full_state`): the model and optimizer
states are gathered to the full tensors of a one-process run before rank 0 writes them, and
`load_full_state` slices them again for this rank, so a run saved at one layout resumes at another
and `moe-analyze` reads any run.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from moe.distributed import DistContext
from moe.expert_parallel import ExpertParallelExperts
from moe.experts import GroupedExperts
from moe.validation import check_choice

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from moe.model import LanguageModel

# torch.distributed.tensor and device_mesh take ~0.8 s to import (sympy): imported where a layout
# needs them, so that one-process runs and the CLIs start without them.


@dataclass
class ParallelConfig:
    """Hydra: `trainer.parallel`. Needs a `torchrun` launch of more than one process for either."""

    # Expert-parallel ranks: each holds E/ep of every MoE layer's experts (1 = every rank holds all).
    ep: int = 1
    # Shard parameters, gradients and optimizer state over all ranks (FSDP2) instead of DDP.
    fsdp: bool = False
    # consolidated: rank 0 writes one file of the whole state (step_N.pt); sharded: every rank writes
    # its parts through torch.distributed.checkpoint (step_N.dcp/, moe/sharded_checkpoint.py). The
    # last checkpoint of a training is consolidated either way (the analysis reads it).
    checkpoint: str = "consolidated"

    def validate(self) -> None:
        """The checks that need no launch (composition runs them; `check_parallel` too)."""
        if self.ep < 1:
            raise ValueError(f"trainer.parallel.ep={self.ep} must be >= 1 (the number of expert-parallel ranks)")
        check_choice("trainer.parallel.checkpoint", self.checkpoint, CHECKPOINT_LAYOUTS)


CHECKPOINT_LAYOUTS = ("consolidated", "sharded")


def check_parallel(cfg: ParallelConfig, world_size: int, *, routed_experts: int, backend: str, compile: bool) -> None:
    """Refuse a layout this launch cannot run, before anything is built; the message names the fix."""
    cfg.validate()
    if (cfg.ep > 1 or cfg.fsdp) and world_size == 1:
        raise ValueError(
            f"trainer.parallel.ep={cfg.ep} fsdp={cfg.fsdp} shards the model over processes, but this is one "
            "process: launch with torchrun --nproc_per_node=N (N >= 2), or drop trainer.parallel"
        )
    if world_size % cfg.ep:
        raise ValueError(
            f"trainer.parallel.ep={cfg.ep} must divide the number of processes ({world_size}): the ranks form "
            f"a {world_size}/ep x ep mesh"
        )
    if cfg.ep > 1:
        if routed_experts % cfg.ep:
            raise ValueError(
                f"trainer.parallel.ep={cfg.ep} must divide the routed experts per layer ({routed_experts}) so "
                "that every rank holds the same number of experts"
            )
        if backend != "native":
            raise ValueError(
                f"trainer.parallel.ep={cfg.ep} runs the native grouped experts only; backend={backend} has its "
                "own kernels for one rank's experts: use backend=native with expert parallelism"
            )
        if compile:
            raise ValueError(
                "trainer.compile=true with trainer.parallel.ep>1 is not supported (the all-to-all dispatch has "
                "data-dependent splits); set trainer.compile=false"
            )


class Parallelism:
    """The chosen layout applied to one model: wraps it (`wrap`), synchronizes and clips gradients
    (`finish_gradients`), and converts its state to and from the consolidated layout."""

    def __init__(self, cfg: ParallelConfig, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.ep_group: dist.ProcessGroup | None = None
        self.dp_group: dist.ProcessGroup | None = None  # the ranks that hold the same experts
        self.world_mesh = None
        self.mesh: DeviceMesh | None = None  # (dp, ep)
        if ctx.enabled and (cfg.ep > 1 or cfg.fsdp):
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(ctx.device.type, (ctx.world_size // cfg.ep, cfg.ep), mesh_dim_names=("dp", "ep"))
            self.mesh = mesh
            self.ep_group, self.dp_group = mesh.get_group("ep"), mesh.get_group("dp")
            self.world_mesh = init_device_mesh(ctx.device.type, (ctx.world_size,)) if cfg.fsdp else None
        self.ddp: DistributedDataParallel | None = None
        self.fsdp_modules: list[FSDPModule] = []
        self.expert_params: dict[str, nn.Parameter] = {}  # name -> this rank's slice [E/ep, ...]

    @property
    def sharded(self) -> bool:
        """Whether no rank holds the whole model (expert parallel or FSDP2): every forward is then a
        collective all ranks take part in."""
        return bool(self.expert_params) or bool(self.fsdp_modules)

    @property
    def trivial(self) -> bool:
        """One process: nothing to wrap, synchronize or gather."""
        return not self.ctx.enabled

    def wrap(self, model: LanguageModel, forward: nn.Module) -> nn.Module:
        """Shard `model` in place (experts over ep, blocks under FSDP2) and return the module to call
        for training: `forward` (the model, or its torch.compile) wrapped by DDP where DDP applies.
        Call before building the optimizer."""
        if self.trivial:
            return forward
        if self.ep_group is not None and self.cfg.ep > 1:
            self.expert_params = shard_experts(model, self.ep_group)
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            ignored = set(self.expert_params.values())
            for block in model.blocks:
                fully_shard(block, mesh=self.world_mesh, ignored_params=ignored)
            fully_shard(model, mesh=self.world_mesh, ignored_params=ignored)
            self.fsdp_modules = [cast("FSDPModule", model)]  # fully_shard made the model one
            return forward
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(self.expert_params))
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(forward, device_ids=device_ids)
        return self.ddp

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Gradients of a micro-step; they are reduced over the ranks on the last one only."""
        if self.ddp is not None and not last:
            with self.ddp.no_sync():
                yield
            return
        for module in self.fsdp_modules:
            module.set_requires_gradient_sync(last)
        yield

    def finish_gradients(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        """Complete the experts' gradients (sum over the dp dimension / world), then clip the global
        gradient norm of the whole model, counting every parameter once; returns that norm."""
        if self.trivial:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        for p in self.expert_params.values():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.dp_group)
                p.grad /= self.ctx.world_size
        return self._clip(params, max_norm)

    def _clip(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        """torch.nn.utils.clip_grad_norm_'s rule over a model whose gradients are replicated (DDP),
        sharded over all ranks (FSDP2 DTensors) or split over the ep group (experts)."""
        experts = {id(p) for p in self.expert_params.values()}
        device = self.ctx.device
        replicated, sharded, split = (torch.zeros((), device=device, dtype=torch.float32) for _ in range(3))
        grads = []
        for p in params:
            if p.grad is None:
                continue
            grads.append(p.grad)
            if _is_dtensor(p.grad):
                sharded += p.grad.to_local().float().pow(2).sum()
            elif id(p) in experts:
                split += p.grad.float().pow(2).sum()
            else:
                replicated += p.grad.float().pow(2).sum()
        if self.fsdp_modules:
            dist.all_reduce(sharded)
        if self.ep_group is not None:
            dist.all_reduce(split, group=self.ep_group)
        total = (replicated + sharded + split).sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
        return total

    # -- the consolidated checkpoint layout ---------------------------------------------------------
    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(model state dict, optimizer state dict) as one process would have them, on rank 0 (the
        other ranks get empty dicts). A collective: every rank calls it. FSDP2 gathers into rank 0's
        CPU memory and the experts gather to rank 0 only; where even that does not fit, use
        `trainer.parallel.checkpoint=sharded`."""
        if self.trivial:
            return model.state_dict(), optimizer.state_dict()
        model_state: dict[str, Any]
        optim_state: dict[str, Any]
        if self.fsdp_modules:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = dict(get_model_state_dict(model, options=options))
            optim_state = cast(dict[str, Any], get_optimizer_state_dict(model, optimizer, options=options))
            if self.ctx.is_main:
                optim_state = _index_keyed(optim_state, model, optimizer)
        else:
            model_state, optim_state = dict(model.state_dict()), optimizer.state_dict()
        experts = self._gather_experts(optimizer)
        if not self.ctx.is_main:
            return {}, {}
        index_of = {name: i for i, name in _param_index_names(model, optimizer).items()}
        optim_state = {**optim_state, "state": dict(optim_state["state"])}
        for name, (weights, moments) in experts.items():
            model_state[name] = weights
            if moments:
                optim_state["state"][index_of[name]] = {**optim_state["state"][index_of[name]], **moments}
        return model_state, optim_state

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict):
        """Load a consolidated (model, optimizer) state into this rank's shards (`full_state`'s inverse)."""
        if self.trivial:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
            return
        if self.expert_params:
            model_state, optim_state = self._slice_experts(model, optimizer, model_state, optim_state)
        if self.fsdp_modules:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, model_state, options=options)
            set_optimizer_state_dict(model, optimizer, _fqn_keyed(optim_state, model, optimizer), options=options)
            return
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)

    def expert_dtensor(self, local: Tensor) -> DTensor:
        """This rank's rows [E/ep, ...] of an expert-parallel tensor as the layer's [E, ...] tensor they
        are part of (replicated over dp, row blocks over ep): how sharded checkpoints save them. A
        view: loading into it writes this rank's rows."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        return DTensor.from_local(local, self.mesh, [Replicate(), Shard(0)], run_check=False)

    def _gather_experts(self, optimizer: torch.optim.Optimizer) -> dict[str, tuple[Tensor, dict[str, Tensor]]]:
        """On rank 0: {name: (weights [E, ...], AdamW moments [E, ...])} of every expert-parallel
        parameter, gathered from the ranks of its ep group; {} elsewhere. A collective over the ep
        group of rank 0 (the other groups hold copies of the same experts)."""
        if not self.expert_params or dist.get_rank(self.dp_group) != 0:
            return {}
        gathered = {}
        for name, p in self.expert_params.items():
            # Every rank steps together, so each holds the same moments (none before the first step).
            moments = {k: v for k, v in optimizer.state.get(p, {}).items() if per_element(v)}
            weights = self._gather_to_first(p.detach())
            gathered[name] = (weights, {k: self._gather_to_first(v) for k, v in moments.items()})
        return gathered if self.ctx.is_main else {}

    def _gather_to_first(self, local: Tensor) -> Tensor:
        """[E/ep, ...] on each rank of the ep group -> [E, ...] on its first rank (in rank order);
        the other ranks get their own rows back (unused)."""
        first = dist.get_rank(self.ep_group) == 0
        parts = [torch.empty_like(local) for _ in range(self.cfg.ep)] if first else None
        dist.gather(local.contiguous(), parts, group=self.ep_group, group_dst=0)
        return torch.cat(parts) if parts is not None else local

    def _slice_experts(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_state: dict[str, Any],
        optim_state: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The consolidated state dicts with every expert-parallel parameter, and its per-element
        optimizer state (AdamW's moments; the step count is a scalar), cut to this rank's rows; new
        dicts, the inputs are left as they are."""
        model_state = {k: self._slice(k, v) if k in self.expert_params else v for k, v in model_state.items()}
        state = dict(optim_state["state"])
        for index, name in _param_index_names(model, optimizer).items():
            if name in self.expert_params and index in state:
                state[index] = {k: self._slice(name, v) if per_element(v) else v for k, v in state[index].items()}
        return model_state, {**optim_state, "state": state}

    def _slice(self, name: str, full: Tensor) -> Tensor:
        local = self.expert_params[name].shape[0]
        start = dist.get_rank(self.ep_group) * local
        return full[start : start + local].clone()


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of `t` (a DTensor's local shard; a plain tensor itself), detached."""
    return (t.to_local() if _is_dtensor(t) else t).detach()


def _is_dtensor(t: Tensor) -> TypeGuard[DTensor]:
    """isinstance(t, DTensor), without importing torch.distributed.tensor where nothing made one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def shard_experts(model: nn.Module, group: dist.ProcessGroup) -> dict[str, nn.Parameter]:
    """Replace every MoE layer's `GroupedExperts` by this rank's `ExpertParallelExperts` slice; returns
    the sliced parameters by name (`blocks.3.ffn.experts.w_in`, ...)."""
    for module in list(model.modules()):
        experts = getattr(module, "experts", None)
        if isinstance(experts, GroupedExperts) and not isinstance(experts, ExpertParallelExperts):
            module.experts = ExpertParallelExperts(experts, group)
    return {n: p for n, p in model.named_parameters() if _is_expert_param(model, n)}


def _is_expert_param(model: nn.Module, name: str) -> bool:
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(owner, ExpertParallelExperts)


def per_element(value: Any) -> bool:
    """Optimizer state that has one entry per parameter element (AdamW's moments), not a scalar step."""
    return isinstance(value, Tensor) and value.ndim > 0


def _param_index_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """The optimizer state dict's parameter index -> the parameter's name (indices count through the
    param groups in order, as `Optimizer.state_dict` numbers them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: names[id(p)] for i, p in enumerate(params)}


def _index_keyed(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict keyed by parameter names (torch.distributed.checkpoint's) -> keyed by
    index (`Optimizer.state_dict`'s, the checkpoint layout)."""
    index_of = {n: i for i, n in _param_index_names(model, optimizer).items()}
    groups = [{**g, "params": [index_of[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index_of[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _fqn_keyed(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`_index_keyed`'s inverse."""
    name_of = _param_index_names(model, optimizer)
    groups = [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {name_of[i]: s for i, s in state["state"].items()}, "param_groups": groups}
