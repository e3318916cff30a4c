"""Step time and all-to-all traffic of expert parallelism at EP = 1, 2, 4, each in its own torchrun
launch of as many processes (gloo on CPU, NCCL on CUDA when there are enough GPUs). Not a test.

Every layout trains the same default MoE (moe.model.ModelConfig) on the same global batch of
`--batch` sequences, split over the ranks: EP=1 is one process (no dispatch), EP=N is N processes
with E/N experts each. Printed per layout: the median optimizer step (forward, backward, gradient
synchronization, AdamW) and the bytes each rank sends through `all_to_all_single` per step
(dispatch and return, forward and backward; counted by wrapping the collective).

    python benchmarks/bench_parallel.py [--steps 10] [--batch 16] [--seq 256] [--ep 1 2 4]

On a 2-core CPU every extra process shares the same two cores, so the step times there measure
the overhead of the dispatch, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist


def worker(args: argparse.Namespace) -> None:
    """One rank: time `args.steps` optimizer steps, count the all-to-all bytes it sends."""
    from moe.config import TrainerConfig
    from moe.distributed import init_distributed
    from moe.model import LanguageModel, ModelConfig
    from moe.parallel import ParallelConfig, Parallelism
    from moe.trainer import build_optimizer

    device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= args.ranks else "cpu"
    ctx = init_distributed(device)
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
    sent = [0]
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if input.is_floating_point():  # the rows and gates; the int64 count exchange is not payload
            rank = dist.get_rank(group)
            local = input_split_sizes[rank] if input_split_sizes else input.shape[0] // dist.get_world_size(group)
            sent[0] += (input.shape[0] - local) * input[:1].numel() * input.element_size()
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(), args.vocab).to(ctx.device)
    parallel = Parallelism(ParallelConfig(ep=args.ep[0]), ctx)  # the launcher passes one EP
    forward = parallel.wrap(model, model)
    optimizer = build_optimizer(model, TrainerConfig())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    rows = args.batch // ctx.world_size
    local = tokens[ctx.rank * rows : (ctx.rank + 1) * rows].to(ctx.device)
    times, traffic = [], []
    for step in range(args.steps + 2):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        start, sent[0] = time.perf_counter(), 0
        out = forward(local[:, :-1], local[:, 1:])
        out.loss.backward()
        parallel.finish_gradients(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # warm-up excluded
            times.append(time.perf_counter() - start)
            traffic.append(sent[0])
    result = {"device": str(ctx.device), "world": ctx.world_size, "times": times, "bytes": traffic}
    gathered: list = [None] * ctx.world_size
    if ctx.enabled:
        dist.all_gather_object(gathered, result)
        dist.destroy_process_group()
    else:
        gathered = [result]
    if ctx.rank == 0:
        Path(args.out).write_text(json.dumps(gathered))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"torch {torch.__version__}, global batch {args.batch} x {args.seq} tokens, default ModelConfig")
    print(f"{'EP':>3} {'device':>7} {'ms/step':>9} {'tokens/s':>10} {'all-to-all MB sent/rank/step':>30}")
    for ep in args.ep:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            own = [str(Path(__file__).resolve()), "--worker", f"--ranks={ep}", f"--ep={ep}", f"--out={out}"]
            own += [f"--steps={args.steps}", f"--batch={args.batch}", f"--seq={args.seq}", f"--vocab={args.vocab}"]
            launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ep}"] if ep > 1 else []
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ep))}
            subprocess.run([sys.executable, *launcher, *own], check=True, env=env)
            ranks = json.loads(out.read_text())
        # A step ends when its slowest rank does.
        step = [max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"]))]
        sent = median([b for r in ranks for b in r["bytes"]])
        print(
            f"{ep:>3} {ranks[0]['device']:>7} {median(step) * 1e3:9.1f} {args.batch * args.seq / median(step):10,.0f} "
            f"{sent / 1e6:30.2f}"
        )


if __name__ == "__main__":
    main()
