"""Where a training step of the default model spends its time, against what this machine's matmuls
can do (a roofline). Not a test.

    python benchmarks/bench_step.py [--steps 5] [--twin] [model/trainer overrides as key=value ...]

1. Matmul throughput of the machine, fp32 and bf16, at every matmul shape of the default model's
   step (forward and the two backward products), measured with torch.mm.
2. The real training step (`moe.trainer.Trainer._train_step` on the built-in corpus: data, forward,
   balancing losses, backward, clip and checks, AdamW) under torch.profiler. Every op's own CPU
   time goes to the part of the model that ran it: forward ops by the module they ran in (hooks open
   a profiler range per part), backward ops by the forward op that created their autograd node
   (the profiler's sequence numbers). Per part: milliseconds per step, share of the step, and for
   the parts with matmuls their FLOPs (2mkn from the recorded shapes), achieved GFLOP/s and the
   time those matmuls would take at the measured fp32 throughput of their shapes (shapes under 1%
   of the FLOPs, such as one expert's rows, are not measured and priced at the best rate seen).

The last lines bound what any fp32 kernel work can gain: the step if every matmul ran at the
measured peak and everything else were free, and if only the non-matmul time vanished.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile, record_function

from moe.config import TrainConfig
from moe.data import prepare_data
from moe.distributed import DistContext
from moe.experts import DenseMLP, GroupedExperts
from moe.layer import MoELayer
from moe.model import dense_twin
from moe.trainer import Trainer

PREFIX = "part::"
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"}
# Parts in print order; "other" is everything no range covers (residual adds, autograd bookkeeping).
PARTS = (
    "data",
    "embedding",
    "attention",
    "ffn norm",
    "router",
    "dispatch",
    "experts / dense MLP",
    "LM head + loss",
    "balancing losses",
    "clip + checks",
    "optimizer",
    "other",
)


class _Range:
    """A profiler range opened by one hook and closed by another."""

    def __init__(self, name: str):
        self.name = PREFIX + name
        self.active: list[record_function] = []

    def open(self, *_: Any) -> None:
        rf = record_function(self.name)
        rf.__enter__()
        self.active.append(rf)

    def close(self, *_: Any) -> None:
        self.active.pop().__exit__(None, None, None)


def _around(module: torch.nn.Module, part: str, last: torch.nn.Module | None = None) -> None:
    """A range from `module`'s forward start to the end of `last`'s forward (default: module's)."""
    r = _Range(part)
    module.register_forward_pre_hook(r.open)
    (last or module).register_forward_hook(r.close)


def _wrap(obj: Any, method: str, part: str) -> None:
    fn = getattr(obj, method)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(PREFIX + part):
            return fn(*args, **kwargs)

    setattr(obj, method, wrapped)


def instrument(trainer: Trainer) -> None:
    """Profiler ranges around every part of the trainer's step (see PARTS)."""
    model = trainer.model
    _around(model.embed, "embedding")
    for block in model.blocks:
        _around(block.attn_norm, "attention", last=block.attn)
        _around(block.ffn_norm, "ffn norm")
        ffn = block.ffn
        if isinstance(ffn, MoELayer):
            _around(ffn.router, "router")
            experts = ffn.experts
            if isinstance(experts, GroupedExperts):
                _around(experts, "dispatch")  # permute, gather, combine: all but compute_rows
                _wrap(experts, "compute_rows", "experts / dense MLP")
            if ffn.shared is not None:
                _around(ffn.shared, "experts / dense MLP")
        elif isinstance(ffn, DenseMLP):
            _around(ffn, "experts / dense MLP")
    head = _Range("LM head + loss")  # the final norm, the head and the cross-entropy
    model.norm.register_forward_pre_hook(head.open)
    model.register_forward_hook(head.close)
    if trainer.balancer is not None:
        _wrap(trainer.balancer, "aux_losses", "balancing losses")
    _wrap(trainer.parallel, "finish_gradients", "clip + checks")
    stream = trainer.stream

    class TimedStream:
        def __next__(self) -> Any:
            with record_function(PREFIX + "data"):
                return next(stream)

        def __getattr__(self, name: str) -> Any:
            return getattr(stream, name)

    trainer.stream = cast(Any, TimedStream())


def _part_of(event: Any) -> str | None:
    while event is not None:
        if event.name.startswith(PREFIX):
            return event.name[len(PREFIX) :]
        if event.name.startswith("Optimizer."):
            return "optimizer"
        event = event.cpu_parent
    return None


def _mm_shape(event: Any) -> tuple[int, int, int] | None:
    """(m, k, n) of a matmul event from its recorded input shapes: the first two matrices are the
    operands (addmm's bias is 1-D; an `out=` tensor comes after them); bmm folds its batch into m."""
    shapes = [s for s in event.input_shapes if len(s) >= 2]
    if len(shapes) < 2:
        return None
    a, b = shapes[0], shapes[1]
    m = a[-2] * (a[0] if event.name == "aten::bmm" else 1)
    return int(m), int(a[-1]), int(b[-1])


def breakdown(events: Any) -> tuple[dict[str, float], dict[str, float], dict[str, float], dict[tuple, float]]:
    """Per part: own CPU microseconds of every op, of matmul ops, matmul FLOPs; FLOPs per mm shape."""
    part_of_seq: dict[int, str] = {}
    for e in events:  # forward ops that created autograd nodes
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and e.fwd_thread is not None:
            part = _part_of(e)
            if part is not None:
                part_of_seq.setdefault(e.sequence_nr, part)

    def part(e: Any) -> str:
        p = _part_of(e)
        if p is not None:
            return p
        node = e
        while node is not None:  # backward: the evaluate_function event of the node
            if node.name.startswith("autograd::engine::evaluate_function") and node.sequence_nr >= 0:
                return part_of_seq.get(node.sequence_nr, "other")
            node = node.cpu_parent
        return "other"

    total: dict[str, float] = defaultdict(float)
    mm_time: dict[str, float] = defaultdict(float)
    mm_flops: dict[str, float] = defaultdict(float)
    shapes: dict[tuple, float] = defaultdict(float)
    for e in events:
        if e.name.startswith(PREFIX):
            continue  # the ranges themselves: their own time is the hooks'
        p = part(e)
        total[p] += e.self_cpu_time_total
        if e.name in MATMULS and e.self_cpu_time_total > 0:
            mm_time[p] += e.self_cpu_time_total
            shape = _mm_shape(e)
            if shape is not None:
                flops = 2.0 * shape[0] * shape[1] * shape[2]
                mm_flops[p] += flops
                shapes[shape] += flops
    return total, mm_time, mm_flops, shapes


def matmul_gflops(shape: tuple[int, int, int], dtype: torch.dtype, seconds: float = 0.3) -> float:
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2.0 * m * k * n * reps / (time.perf_counter() - start) / 1e9


@contextmanager
def quiet_trainer(cfg: TrainConfig, twin: bool) -> Iterator[Trainer]:
    with tempfile.TemporaryDirectory() as run_dir:
        data = prepare_data(cfg.data, seed=cfg.seed)
        model_cfg = dense_twin(cfg.model, "active") if twin else cfg.model
        ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        yield Trainer(cfg, model_cfg, "dense_active" if twin else "moe", data, Path(run_dir), ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 unprofiled)")
    ap.add_argument("--twin", action="store_true", help="profile the active-matched dense twin instead")
    ap.add_argument("overrides", nargs="*", help="TrainConfig overrides, e.g. trainer.micro_batch_size=8")
    args = ap.parse_args()
    schema = OmegaConf.structured(TrainConfig)
    cfg = cast(TrainConfig, OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(args.overrides))))
    with quiet_trainer(cfg, args.twin) as trainer:
        trainer.configure_process()  # threads and retained memory, as fit() sets them
        instrument(trainer)
        for _ in range(3):
            trainer._train_step()
        walls = []
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.steps):
                start = time.perf_counter()
                trainer._train_step()
                walls.append(time.perf_counter() - start)
        # The same steps unprofiled: the profiler's own overhead inflates the breakdown a little.
        plain = []
        for _ in range(args.steps):
            start = time.perf_counter()
            trainer._train_step()
            plain.append(time.perf_counter() - start)
        tokens = trainer.t.micro_batch_size * trainer.data.seq_len * trainer.t.grad_accum_steps
    total, mm_time, mm_flops, shapes = breakdown(prof.events())
    n = args.steps
    step_ms = statistics.median(plain) * 1e3
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'dense twin' if args.twin else 'MoE'} of the default config, {tokens} tokens/step"
    )
    print(
        f"step: {step_ms:.0f} ms unprofiled ({tokens / step_ms * 1e3:,.0f} tokens/s), "
        f"{statistics.median(walls) * 1e3:.0f} ms profiled"
    )

    print("\nmatmul throughput of this machine at the step's shapes (torch.mm, GFLOP/s):")
    peak32: dict[tuple, float] = {}
    print(f"  {'m x k x n':>20s} {'share of FLOPs':>15s} {'fp32':>8s} {'bf16':>8s}")
    all_flops = sum(shapes.values())
    for shape, flops in sorted(shapes.items(), key=lambda kv: -kv[1]):
        if flops / all_flops < 0.01:
            continue
        peak32[shape] = matmul_gflops(shape, torch.float32)
        bf16 = matmul_gflops(shape, torch.bfloat16, seconds=0.1)
        print(f"  {' x '.join(map(str, shape)):>20s} {flops / all_flops:15.1%} {peak32[shape]:8.1f} {bf16:8.1f}")
    best = max(peak32.values())

    profiled_total = sum(total.values())
    scale = step_ms / (profiled_total / 1e3 / n)  # profiled op time -> unprofiled wall time
    print(f"\nper part (ms/step, own CPU time of its ops, scaled to the unprofiled step; x{scale:.2f}):")
    print(f"  {'part':<22s} {'ms':>7s} {'share':>6s} {'mm ms':>7s} {'GFLOP':>6s} {'GFLOP/s':>8s}")
    rows: list[tuple[str, float]] = [(p, total.get(p, 0.0)) for p in PARTS]
    for p, us in rows:
        ms = us / 1e3 / n * scale
        if mm_flops.get(p):
            gf = mm_flops[p] / n / 1e9
            rate = mm_flops[p] / (mm_time[p] / 1e6) / 1e9
            extra = f" {mm_time[p] / 1e3 / n * scale:7.1f} {gf:6.2f} {rate:8.1f}"
        else:
            extra = ""
        print(f"  {p:<22s} {ms:7.1f} {us / profiled_total:6.1%}{extra}")
    mm_ms = sum(mm_time.values()) / 1e3 / n * scale
    flops_step = sum(mm_flops.values()) / n
    at_peak_ms = sum(f / n / (peak32.get(s, best) * 1e9) for s, f in shapes.items()) * 1e3
    print(
        f"\nmatmuls: {flops_step / 1e9:.1f} GFLOP/step in {mm_ms:.0f} ms ({flops_step / mm_ms / 1e6:.0f} GFLOP/s); "
        f"at this machine's fp32 throughput of their shapes {at_peak_ms:.0f} ms"
    )
    print(f"everything else: {step_ms - mm_ms:.0f} ms ({(step_ms - mm_ms) / step_ms:.0%} of the step)")
    print(
        f"bounds: matmuls at measured fp32 speed and nothing else -> {step_ms / at_peak_ms:.2f}x today's tokens/s; "
        f"today's matmuls and everything else free -> {step_ms / mm_ms:.2f}x"
    )


if __name__ == "__main__":
    main()
