"""One rank of the expert-parallel equivalence test (tests/moe/test_parallel.py), launched by torchrun.

For every layout given (`ep:fsdp`, e.g. `2:0`) and every case of `CASES` it builds the model from
the seed, takes this rank's rows of a fixed global batch, and runs two optimizer steps: it records, on rank 0,
every rank's losses, routing record and balancing loss, every parameter's full gradient after the
first step's synchronization and clipping, and the second step's losses. The test repeats the
same steps in one process, without any parallel code, and compares.

    torchrun --nproc_per_node=N tests/moe/parallel_worker.py <out.pt> <ep:fsdp> [<ep:fsdp> ...]
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from moe.balance import BalanceConfig, LoadBalancer
from moe.config import TrainerConfig
from moe.distributed import DistContext
from moe.layer import MoEConfig
from moe.model import LanguageModel, ModelConfig
from moe.parallel import ParallelConfig, Parallelism
from moe.routers import resolve_router_config
from moe.trainer import build_optimizer

VOCAB, SEQ, ROWS_PER_RANK = 64, 16, 2
CASES = {
    # name: (router config, balance scope, capacity factor, grad clip)
    "topk_micro": ({"kind": "topk"}, "micro_batch", None, 0.05),
    "topk_global": ({"kind": "topk"}, "global_batch", None, 0.0),
    "sigmoid_aux_free": ({"kind": "sigmoid"}, "aux_free", None, 0.05),
    "topk_capacity": ({"kind": "topk"}, "micro_batch", 1.0, 0.0),
    "expert_choice": ({"kind": "expert_choice"}, "none", None, 0.0),
}


def model_config(capacity_factor: float | None) -> ModelConfig:
    return ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        moe=MoEConfig(num_experts=4, top_k=2, expert_width=32, capacity_factor=capacity_factor),
    )


def global_batch(world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, targets [world * ROWS_PER_RANK, SEQ], the same on every rank."""
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, VOCAB, (world * ROWS_PER_RANK, SEQ + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def build(case: str) -> tuple[LanguageModel, LoadBalancer, TrainerConfig]:
    router, scope, capacity, clip = CASES[case]
    torch.manual_seed(0)
    model = LanguageModel(model_config(capacity), VOCAB, resolve_router_config(router))
    balancer = LoadBalancer(BalanceConfig(scope=scope, lbl_coef=0.05, z_coef=0.01), 4)
    return model, balancer, TrainerConfig(lr=0.02, grad_clip=clip, warmup_steps=0)


def main(out: str, layouts: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {}
    for layout in layouts:
        ep, fsdp = (int(x) for x in layout.split(":"))
        results[layout] = run_layout(ep, bool(fsdp))
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def run_layout(ep: int, fsdp: bool) -> dict[str, list[dict]]:
    """{case: every rank's record} of the two steps under one layout."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = DistContext(rank, world, 0, torch.device("cpu"))
    results = {}
    for case in CASES:
        model, balancer, tcfg = build(case)
        parallel = Parallelism(ParallelConfig(ep=ep, fsdp=fsdp), ctx)
        forward = parallel.wrap(model, model)
        optimizer = build_optimizer(model, tcfg)
        record: dict = {"loss": [], "lbl": []}
        for step in range(2):
            tokens, targets = global_batch(world, step)
            rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
            with parallel.micro_step(last=True):
                out_ = forward(tokens[rows], targets[rows])
                aux = balancer.aux_losses(out_.routings, SEQ)
                (out_.loss + aux.total).backward()
            record["loss"].append(float(out_.loss))
            record["lbl"].append(float(aux.lbl))
            if step == 0:
                record["routing"] = [
                    (r.indices.clone(), r.kept.clone(), r.weights.detach().clone()) for r in out_.routings
                ]
            norm = parallel.finish_gradients(list(model.parameters()), tcfg.grad_clip or float("inf"))
            if step == 0:
                record["grad_norm"] = float(norm)
                record["grads"] = full_grads(model, parallel)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loads = balancer.end_step()
            if balancer.adapts_routers:
                for layer, load in zip(model.moe_layers, loads):
                    layer.router.after_step(load)
        model_state, _ = parallel.full_state(model, optimizer)
        record["final_state"] = {k: v.detach().clone() for k, v in model_state.items()}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, record)
        results[case] = gathered
    return results


def full_grads(model: torch.nn.Module, parallel: Parallelism) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as one process holds it (experts gathered over the ep group)."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is None:
            continue
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        elif name in parallel.expert_params:
            parts = [torch.empty_like(g) for _ in range(parallel.cfg.ep)]
            dist.all_gather(parts, g.contiguous(), group=parallel.ep_group)
            g = torch.cat(parts)
        grads[name] = g.detach().clone()
    return grads


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
