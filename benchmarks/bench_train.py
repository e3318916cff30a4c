"""Training throughput of the MoE LM vs its active-matched dense twin, measured side by side in one
run (same batches, same optimizer): prints tokens/s and the MoE/dense step-time ratio. Not a test.

    python benchmarks/bench_train.py [--steps 20] [--batch 16] [--seq 256] [overrides for ModelConfig...]
"""

from __future__ import annotations

import argparse
import time

import torch
from allocator import add_allocator_flag, set_allocator

from moe.config import TrainerConfig
from moe.model import LanguageModel, ModelConfig, dense_twin
from moe.trainer import build_optimizer


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def step_times(models: dict[str, LanguageModel], tokens: torch.Tensor, steps: int) -> dict[str, list[float]]:
    """Seconds of each optimizer step (forward, backward, AdamW) of each model. The models take
    turns step by step, so a slow spell of a shared machine hits both alike."""
    optimizers = {name: build_optimizer(model, TrainerConfig()) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(steps + 2):
        for name, model in models.items():
            start = time.perf_counter()
            out = model(tokens[:, :-1], tokens[:, 1:])
            out.loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if i >= 2:  # warm-up steps excluded
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    add_allocator_flag(parser)
    args = parser.parse_args()
    allocator = set_allocator(args.default_allocator)
    cfg = ModelConfig()
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    models = {}
    for name, model_cfg in (("moe", cfg), ("dense_active", dense_twin(cfg, "active"))):
        torch.manual_seed(0)
        models[name] = LanguageModel(model_cfg, args.vocab)
    times = step_times(models, tokens, args.steps)
    n = args.batch * args.seq
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n} tokens/step, default ModelConfig, "
        f"malloc: {allocator}"
    )
    for name, seconds in times.items():
        print(f"  {name:14s} {median(seconds) * 1e3:7.1f} ms/step  {n / median(seconds):9,.0f} tokens/s")
    ratios = [m / d for m, d in zip(times["moe"], times["dense_active"])]
    print(
        f"  MoE / dense step time = {median(ratios):.2f} (median of per-step ratios; "
        f"quartiles {sorted(ratios)[len(ratios) // 4]:.2f}-{sorted(ratios)[3 * len(ratios) // 4]:.2f}; target <= 1.2)"
    )


if __name__ == "__main__":
    main()
