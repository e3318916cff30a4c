"""Forward+backward time of the native MoE layer vs a FLOP-matched dense MLP, a naive per-expert
loop and (if `transformers` is installed) Hugging Face's MixtralSparseMoeBlock with the same
weights under each of its experts backends (`eager`, `grouped_mm`, `batched_mm`: transformers 5's
`experts_implementation`). Prints time ratios measured side by side in one run, native / the best HF
backend, and the floor any implementation of the same function with the same fp32 kernels pays: the
expert matmuls on perfectly balanced rows plus gathering and combining the token copies. Not a test.

    python benchmarks/bench_layer.py [--tokens 4096] [--repeats 20] [--hf-backends eager grouped_mm]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from allocator import add_allocator_flag, set_allocator

from moe.dispatch import combine, gather_rows, permute
from moe.experts import DenseMLP, activate
from moe.layer import MoEConfig, MoELayer, build_moe_layer
from moe.routers import RouterConfig
from moe.routing import Routing
from moe.sizing import dense_twin_width

SHAPES = [
    dict(num_experts=8, top_k=2, d_model=256, expert_width=512),
    dict(num_experts=64, top_k=8, d_model=256, expert_width=64),
]


def timed(fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of forward+backward of each function. They take turns repeat by repeat, so a
    slow spell of a shared machine hits all of them alike."""

    def step(fn):
        x.grad = None
        out = fn(x)
        out.sum().backward()

    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats + 2):
        for name, fn in fns.items():
            start = time.perf_counter()
            step(fn)
            if i >= 2:  # warm-up excluded
                times[name].append(time.perf_counter() - start)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def naive_loop(layer: MoELayer):
    """Per-expert loop over boolean masks (the textbook implementation)."""

    def run(x):
        routing: Routing = layer.router(x)
        out = torch.zeros_like(x)
        for e in range(layer.experts.num_experts):
            token, slot = torch.nonzero(routing.indices == e, as_tuple=True)
            if token.numel():
                h = activate(x[token] @ layer.experts.w_in[e], layer.experts.activation) @ layer.experts.w_out[e]
                out = out.index_add(0, token, h * routing.weights[token, slot, None])
        return out

    return run


def expert_matmul_floor(layer: MoELayer, tokens: int):
    """The expert matmuls and activation alone: T*k rows split evenly over the E experts (perfect
    balance, no padding), one batched matmul per projection, no router, dispatch or gates. Any
    layer computing the same function with the same fp32 kernels does at least this work."""
    experts = layer.experts
    rows = tokens * layer.top_k // experts.num_experts
    x_ECD = torch.randn(experts.num_experts, rows, experts.w_in.shape[1], requires_grad=True)

    def run(x):
        x_ECD.grad = None
        h = activate(torch.bmm(x_ECD, experts.w_in), experts.activation)
        return torch.bmm(h, experts.w_out)

    return run


HF_BACKENDS = ("eager", "grouped_mm", "batched_mm")
# batched_mm gathers every assignment's expert weights ([T*k, D, F]): seconds per step at these shapes.
SLOW_HF_BACKENDS = ("batched_mm",)


def hf_block(layer: MoELayer, cfg: MoEConfig, d_model: int, backend: str):
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    hf_cfg = MixtralConfig(
        hidden_size=d_model,
        intermediate_size=cfg.expert_width,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        router_jitter_noise=0.0,
        experts_implementation=backend,
    )
    block = MixtralSparseMoeBlock(hf_cfg)
    F = cfg.expert_width
    sd = block.state_dict()
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        w_in, w_out = layer.experts.w_in, layer.experts.w_out
        if "experts.gate_up_proj" in sd:  # transformers >= 4.57 stores experts fused
            gu = block.experts.gate_up_proj
            gu.copy_(w_in.transpose(1, 2) if gu.shape[1] == 2 * F else w_in)
            dp = block.experts.down_proj
            dp.copy_(w_out.transpose(1, 2) if dp.shape[1] == d_model else w_out)
        else:
            for e, expert in enumerate(block.experts):
                expert.w1.weight.copy_(w_in[e, :, :F].t())
                expert.w3.weight.copy_(w_in[e, :, F:].t())
                expert.w2.weight.copy_(w_out[e].t())

    def run(x):
        out = block(x[None])
        return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)

    return block, run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    add_allocator_flag(parser)
    parser.add_argument("--hf-backends", nargs="*", default=list(HF_BACKENDS), choices=HF_BACKENDS)
    args = parser.parse_args()
    allocator = set_allocator(args.default_allocator)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, fwd+bwd median, "
        f"malloc: {allocator}"
    )
    for shape in SHAPES:
        d_model = shape.pop("d_model")
        torch.manual_seed(0)
        cfg = MoEConfig(**shape)
        layer = build_moe_layer("native", d_model, cfg, RouterConfig(kind="topk"))  # std 0.02 init -> balanced routing
        dense = DenseMLP(d_model, dense_twin_width(cfg, "active"))
        x = torch.randn(args.tokens, d_model, requires_grad=True)
        fns = {
            "dense (width k*f)": dense,
            "native MoE": lambda v, layer=layer: layer(v)[0],
            "naive per-expert loop": naive_loop(layer),
        }
        slow = {}
        for backend in args.hf_backends:
            hf = hf_block(layer, cfg, d_model, backend)
            if hf is None:
                break
            _, run = hf
            with torch.no_grad():
                torch.testing.assert_close(run(x), layer(x)[0], rtol=1e-4, atol=1e-5)
            (slow if backend in SLOW_HF_BACKENDS else fns)[f"HF Mixtral block, {backend}"] = run
        # floor: gathering and scattering the T*k token copies, forward and backward
        with torch.no_grad():
            dispatch = permute(layer.router(x))
        fns["gather+combine only"] = lambda v, dispatch=dispatch: combine(gather_rows(v, dispatch), dispatch, len(v))
        fns["expert matmuls only"] = expert_matmul_floor(layer, args.tokens)
        results = timed(fns, x, args.repeats)
        # Timed apart, after the others: interleaved, its tens of GB of traffic slow the others too.
        results.update(timed(slow, x, min(args.repeats, 3)) if slow else {})
        base = results["dense (width k*f)"]
        with torch.no_grad():
            native = layer.experts.dispatch(layer.router(x), cuda=False)
        kept = int(native.counts.sum())
        layout = (
            "ragged"
            if native.buckets is None
            else f"padded in {len(native.buckets)} bucket(s), {native.row_token.numel() / kept - 1:.1%} extra rows"
        )
        print(f"\nE={cfg.num_experts} k={cfg.top_k} d={d_model} f={cfg.expert_width}; native layout: {layout}")
        for name, seconds in results.items():
            print(f"  {name:28s} {seconds * 1e3:8.1f} ms   {seconds / base:5.2f}x dense")
        hf_times = {name: t for name, t in results.items() if name.startswith("HF ")}
        if hf_times:
            best = min(hf_times, key=hf_times.__getitem__)
            print(f"  native / best HF ({best.split(', ')[-1]}) = {results['native MoE'] / hf_times[best]:.2f}")
            floor = results["expert matmuls only"] + results["gather+combine only"]
            slack = 0.9 * hf_times[best] - floor
            print(
                f"  floor (expert matmuls + gather/combine) = {floor / hf_times[best]:.2f} x best HF: native <= 0.9 x "
                f"best HF leaves {slack * 1e3:.1f} ms for the router, dispatch, gates and load imbalance"
            )


if __name__ == "__main__":
    main()
