"""Overhead of recording routing: `record_routing` vs a plain eval forward over the same batches.

Both sides run the model in eval mode under no_grad with targets (the recorder also needs the
per-token loss), so the ratio is the cost of the hooks, the device-to-host copies and the on-the-fly
counting. Target: <= 1.10. Prints seconds per batch and the ratio, with and without raw records.
Not a test.

    python benchmarks/bench_recorder.py [--batches 16] [--batch-size 8] [--seq-len 256] [--vocab 4096]
                                        [--experts 8] [--top-k 2] [--layers 4] [--d-model 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from analysis.recorder import record_routing
from moe.data.batch import Batch
from moe.layer import MoEConfig
from moe.model import LanguageModel, ModelConfig
from moe.routers import RouterConfig

CLOCK = time.perf_counter


def make_batches(n: int, batch_size: int, seq_len: int, vocab: int, num_domains: int) -> list[Batch]:
    """Random tokens on the CPU, as a data loader yields them; each row one document of one domain."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
        rows = torch.arange(batch_size) + i * batch_size
        domain = (rows % num_domains)[:, None].expand(batch_size, seq_len)
        doc = rows[:, None].expand(batch_size, seq_len)
        out.append(
            Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), domain.contiguous(), doc.contiguous())
        )
    return out


def plain(model: LanguageModel, batches: list[Batch], device: str) -> None:
    """The evaluation the recorder rides on: copy each batch over, forward with targets, keep the loss."""
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for b in batches:
            b = b.to(device)
            total += model(b.tokens, b.targets).token_loss.sum()
    total.item()


def timed(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Fastest seconds of each `fn()` over `repeats` rounds (after one warm-up round). The methods
    alternate within a round and the minimum is kept, so load from other processes, which only
    ever adds time, affects neither side more than the other."""

    def once(fn) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = CLOCK()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return CLOCK() - start

    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], once(fn))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--expert-width", type=int, default=256)
    p.add_argument("--domains", type=int, default=4)
    p.add_argument("--router", default="topk")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="process: CPU seconds of this process, robust to other processes on a shared CPU "
        "(use with one thread; on CUDA only wall time is meaningful)",
    )
    args = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter

    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=max(1, args.d_model // 64),
        moe=MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_width=args.expert_width),
    )
    model = LanguageModel(cfg, args.vocab, RouterConfig(kind=args.router)).to(args.device).eval()
    batches = make_batches(args.batches, args.batch_size, args.seq_len, args.vocab, args.domains)
    tokens = args.batches * args.batch_size * args.seq_len

    times = timed(
        {
            "plain eval forward": lambda: plain(model, batches, args.device),
            "record_routing (keep_records=False)": lambda: record_routing(
                model, batches, num_domains=args.domains, keep_records=False
            ),
            "record_routing (keep_records=True)": lambda: record_routing(
                model, batches, num_domains=args.domains, keep_records=True
            ),
        },
        args.repeats,
        args.device,
    )
    base = times["plain eval forward"]
    rows = list(times.items())

    print(
        f"{args.device}: {args.layers} MoE layers, E={args.experts}, k={args.top_k}, d={args.d_model}, "
        f"V={args.vocab}, {args.batches} batches of {args.batch_size}x{args.seq_len} ({tokens} tokens), "
        f"{torch.get_num_threads()} threads, {args.clock} clock"
    )
    for name, t in rows:
        print(f"  {name:<36} {1e3 * t / args.batches:8.2f} ms/batch   ratio {t / base:5.3f}")


if __name__ == "__main__":
    main()
