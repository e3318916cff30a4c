"""GPU: forward+backward throughput of one MoE layer, native (torch._grouped_mm) vs MegaBlocks
(`backend=megablocks`) vs a FLOP-matched dense MLP, at realistic sizes, bf16 autocast over float32
master weights (as training runs them). Prints tokens/s, model FLOPs utilization (MFU) and the
native/MegaBlocks time ratio (target <= 1.1), all measured in one run. Not a test.

    python benchmarks/bench_gpu.py [--tokens 16384] [--repeats 20] [--peak-tflops 989]

--peak-tflops is the GPU's dense bf16 peak (H100 SXM: 989; H200: 989; A100: 312). MFU counts the
layer's matmul FLOPs only: 3 x 2 x tokens x active parameters (forward + backward).
"""

from __future__ import annotations

import argparse

import torch

from moe.experts import DenseMLP
from moe.layer import MoEConfig, build_moe_layer
from moe.routers import RouterConfig
from moe.sizing import dense_twin_width, layer_size

SHAPES = [
    dict(num_experts=64, top_k=8, d_model=2048, expert_width=1024),  # OLMoE-1B-7B's layer
    dict(num_experts=8, top_k=2, d_model=2048, expert_width=4096),
]


def cuda_seconds(fn, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward+backward, timed with CUDA events."""

    def step():
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x)
        out.float().sum().backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU; benchmarks/bench_layer.py times the CPU path")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens, bf16 autocast")
    for shape in SHAPES:
        d = shape["d_model"]
        cfg = MoEConfig(num_experts=shape["num_experts"], top_k=shape["top_k"], expert_width=shape["expert_width"])
        torch.manual_seed(0)
        x = torch.randn(args.tokens, d, device="cuda", requires_grad=True)
        native = build_moe_layer("native", d, cfg, RouterConfig()).cuda()
        dense = DenseMLP(d, dense_twin_width(cfg, "active")).cuda()
        active = layer_size(native).active_params
        flops = 3 * 2 * args.tokens * active
        rows = {
            "dense (k*f)": cuda_seconds(dense, x, args.repeats),
            "native": cuda_seconds(lambda t, native=native: native(t)[0], x, args.repeats),
        }
        try:
            mb = build_moe_layer("megablocks", d, cfg, RouterConfig()).cuda()
            mb.load_state_dict(native.state_dict())
            rows["megablocks"] = cuda_seconds(lambda t, mb=mb: mb(t)[0], x, args.repeats)
        except Exception as err:  # the benchmark still reports the native numbers
            print(f"  megablocks unavailable: {err}")
        print(f"E={cfg.num_experts} k={cfg.top_k} d={d} f={cfg.expert_width}: {active:,} active params/token")
        for name, sec in rows.items():
            mfu = flops / sec / (args.peak_tflops * 1e12)
            print(f"  {name:12s} {sec * 1e3:8.2f} ms  {args.tokens / sec:12,.0f} tokens/s  MFU {mfu:6.1%}")
        if "megablocks" in rows:
            print(f"  native / megablocks time: {rows['native'] / rows['megablocks']:.2f}  (target <= 1.1)")
        print(f"  native / dense time: {rows['native'] / rows['dense (k*f)']:.2f}")


if __name__ == "__main__":
    main()
