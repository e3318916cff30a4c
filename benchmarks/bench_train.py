"""Training throughput of the MoE LM vs its active-matched dense twin, measured side by side in one
run (same batches, same optimizer): prints tokens/s and the MoE/dense step-time ratio. Not a test.

    python benchmarks/bench_train.py [--steps 20] [--batch 16] [--seq 256] [overrides for ModelConfig...]
"""

from __future__ import annotations

import argparse
import time

import torch

from moe.config import TrainerConfig
from moe.model import LanguageModel, ModelConfig, dense_twin
from moe.trainer import build_optimizer


def step_seconds(model: LanguageModel, tokens: torch.Tensor, steps: int) -> float:
    """Median seconds of one optimizer step (forward, backward, AdamW)."""
    optimizer = build_optimizer(model, TrainerConfig())
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    cfg = ModelConfig()
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    results = {}
    for name, model_cfg in (("moe", cfg), ("dense_active", dense_twin(cfg, "active"))):
        torch.manual_seed(0)
        results[name] = step_seconds(LanguageModel(model_cfg, args.vocab), tokens, args.steps)
    n = args.batch * args.seq
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n} tokens/step, default ModelConfig")
    for name, seconds in results.items():
        print(f"  {name:14s} {seconds * 1e3:7.1f} ms/step  {n / seconds:9,.0f} tokens/s")
    print(f"  MoE / dense step time = {results['moe'] / results['dense_active']:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
