"""backend=megablocks: MegaBlocks' dropless expert computation behind our router (CUDA only).

Only the experts change between the backends: `moe.layer.MoELayer` keeps the native router
(float32, every router kind, knockout masks, capacity) and the shared experts, and its `Routing`
record is what MegaBlocks' `ParallelDroplessMLP` (the expert half of its `dMoE`) receives as
(scores, weights, indices); the trainer's `LoadBalancer` and the analysis recorder read the same
record as with the native backend. MegaBlocks' own router is not used: it is softmax top-k only and runs in the
weights' dtype, while the design keeps one router implementation.

MegaBlocks' balancing loss and z-loss are switched off (`moe_loss_weight = moe_zloss_weight = 0`):
they exist only at micro-batch scope and accumulate in module-level lists that must be drained
after every forward. Ours are computed from the routing record for every scope, with MegaBlocks'
normalization (`E/(k*T) * sum_e count_e * mean_t p_e`); with zero weights MegaBlocks does not append
to its lists, and the layer drains them after each forward anyway, so nothing leaks between steps
or models.

Weights: the experts' parameters stay float32 master weights (`Arguments(bf16=False)`); each
forward casts them to the autocast dtype through `torch.func.functional_call`, since MegaBlocks'
grouped GEMM takes bf16 operands and the gradients still reach the float32 parameters.

Checkpoints are backend-agnostic: `state_dict()` of `MegablocksExperts` is in the native layout
(`w_in [E, D, n*F]`, `w_out [E, F, D]`) and `load_state_dict` accepts it, so a model
trained with MegaBlocks on GPUs is analyzed with the native layer on a CPU. MegaBlocks keeps the
expert weights as `w1`, (`v1`,) `w2`, each `[E*F, D]`: `x @ w1[e].T` (gate), `x @ v1[e].T` (up,
GLU only), `h @ w2[e]`.

Install: `pip install 'moe-specialization[megablocks]'`. MegaBlocks pins its torch (0.7: torch
2.7.0) and numpy (< 2.1) and builds CUDA kernels, so the extra installs only where those pins hold.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from moe.experts import activate, compute_dtype
from moe.routing import Routing

if TYPE_CHECKING:
    from moe.layer import MoEConfig

INSTALL_HINT = (
    "pip install 'moe-specialization[megablocks]' on a Linux machine with CUDA (MegaBlocks pins "
    "torch 2.7.0 and numpy<2.1), or use backend=native"
)
_MB_KEYS = ("w1", "v1", "w2")


class BackendUnavailable(RuntimeError):
    """backend=megablocks was asked for where MegaBlocks or CUDA is missing."""


def require_megablocks() -> Any:
    """Import MegaBlocks' dMoE module (`megablocks.layers.dmoe`), or raise BackendUnavailable naming
    what is missing and the fix. Imported lazily: CPU installs never touch MegaBlocks."""
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "backend=megablocks needs a CUDA GPU (MegaBlocks' kernels are CUDA-only) and "
            "none is visible; use backend=native on this machine"
        )
    try:
        return importlib.import_module("megablocks.layers.dmoe")
    except ImportError as err:
        raise BackendUnavailable(f"backend=megablocks: MegaBlocks is not importable ({err}); {INSTALL_HINT}") from err


def megablocks_arguments(
    d_model: int, cfg: MoEConfig, *, init_std: float, out_std: float | None, device: Any = None
) -> dict[str, Any]:
    """Keyword arguments of `megablocks.layers.arguments.Arguments` for the routed experts of a
    `moe.layer.MoEConfig` (fine-grained experts included: g*E experts of width f/g, top g*k)."""
    glu = cfg.activation == "swiglu"
    kwargs = {
        "hidden_size": d_model,
        "ffn_hidden_size": cfg.routed_width,
        "moe_num_experts": cfg.routed_experts,
        "moe_top_k": cfg.routed_top_k,
        "mlp_type": "glu" if glu else "mlp",
        "mlp_impl": "grouped",
        "activation_fn": F.silu if glu else F.gelu,
        "bias": False,
        "return_bias": False,
        # Our router's weights arrive already normalized (or not, per router.renormalize).
        "moe_normalize_expert_weights": None,
        # Losses come from the routing record (see the module docstring).
        "moe_loss_weight": 0.0,
        "moe_zloss_weight": 0.0,
        # Float32 master weights, cast per forward.
        "fp16": False,
        "bf16": False,
        "init_method": _normal(init_std),
        "output_layer_init_method": _normal(init_std if out_std is None else out_std),
    }
    if device is not None:
        kwargs["device"] = device
    return kwargs


def _normal(std: float) -> Callable[[Tensor], Tensor]:
    def init(t: Tensor) -> Tensor:
        return nn.init.normal_(t, mean=0.0, std=std)

    return init


def native_to_megablocks(w_in: Tensor, w_out: Tensor, activation: str) -> dict[str, Tensor]:
    """Native expert weights -> MegaBlocks' layout.

    w_in [E, D, n*F] (SwiGLU: gate columns then up columns), w_out [E, F, D] ->
    {"w1": [E*F, D], "v1": [E*F, D] (SwiGLU only), "w2": [E*F, D]}.
    """
    E, D, nF = w_in.shape
    F_ = w_out.shape[1]
    out = {"w1": w_in[:, :, :F_].transpose(1, 2).reshape(E * F_, D)}
    if activation == "swiglu":
        if nF != 2 * F_:
            raise ValueError(f"SwiGLU w_in has {nF} columns per expert, expected 2 * {F_}")
        out["v1"] = w_in[:, :, F_:].transpose(1, 2).reshape(E * F_, D)
    out["w2"] = w_out.reshape(E * F_, D)
    return {k: v.contiguous() for k, v in out.items()}


def megablocks_to_native(weights: Mapping[str, Tensor], num_experts: int) -> tuple[Tensor, Tensor]:
    """Inverse of `native_to_megablocks`: {"w1", ["v1"], "w2"} -> (w_in [E, D, n*F], w_out [E, F, D])."""
    w1, w2 = weights["w1"], weights["w2"]
    EF, D = w1.shape
    F_ = EF // num_experts
    parts = [w1.view(num_experts, F_, D).transpose(1, 2)]
    if "v1" in weights:
        parts.append(weights["v1"].view(num_experts, F_, D).transpose(1, 2))
    return torch.cat(parts, dim=2).contiguous(), w2.view(num_experts, F_, D).contiguous()


class MegablocksExperts(nn.Module):
    """The megablocks experts backend of `moe.layer.MoELayer`: (x_TD, Routing) -> y_TD through
    MegaBlocks' dropless grouped GEMM.

    `mlp` is MegaBlocks' `ParallelDroplessMLP` (built from `megablocks_arguments` when not given;
    tests pass a reference module with the same interface and parameter layout). Its state dict is
    the native layout (`w_in [E, D, n*F]`, `w_out [E, F, D]`), converted by hooks both ways.
    """

    def __init__(
        self,
        d_model: int,
        cfg: MoEConfig,
        *,
        init_std: float = 0.02,
        out_std: float | None = None,
        mlp: nn.Module | None = None,
    ):
        super().__init__()
        self.activation, self.num_experts = cfg.activation, cfg.routed_experts
        # MegaBlocks' module-level loss lists, drained after every forward in case a MegaBlocks
        # version fills them regardless of the zero loss weights.
        self._drain: list[Callable[[], None]] = []
        if mlp is None:
            dmoe = require_megablocks()
            from megablocks.layers import moe as mb_moe
            from megablocks.layers import router as mb_router

            self._drain = [mb_moe.clear_load_balancing_loss, getattr(mb_router, "clear_router_zloss", lambda: None)]
            from megablocks.layers.arguments import Arguments

            args = Arguments(
                **megablocks_arguments(
                    d_model, cfg, init_std=init_std, out_std=out_std, device=torch.cuda.current_device()
                )
            )
            mlp = dmoe.ParallelDroplessMLP(args)
        self.mlp = mlp
        # Public names since torch 2.5; the private ones (same hook signatures) before.
        post = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        post(_to_native_state)
        if hasattr(self, "register_load_state_dict_pre_hook"):
            self.register_load_state_dict_pre_hook(_from_native_state)
        else:
            self._register_load_state_dict_pre_hook(_from_native_state, with_module=True)

    def forward(self, x_TD: Tensor, routing: Routing) -> Tensor:
        dtype = compute_dtype(x_TD)
        # Dropped slots (capacity, knockouts) keep their rows in the dropless kernels but weigh 0,
        # so they add nothing: the token passes through the residual for that slot, as natively.
        weights = (routing.weights * routing.kept).to(dtype)
        params = {name: p.to(dtype) for name, p in self.mlp.named_parameters()}
        y_TD = functional_call(self.mlp, params, (x_TD.to(dtype), routing.probs, weights, routing.indices))
        for drain in self._drain:
            drain()
        return y_TD

    def native_weights(self) -> tuple[Tensor, Tensor]:
        """(w_in [E, D, n*F], w_out [E, F, D]) in the native layout."""
        params = dict(self.mlp.named_parameters())
        return megablocks_to_native({k: params[n] for k, n in _expert_params(self).items()}, self.num_experts)

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """One expert, ungated, on any rows [N, D] -> [N, D] (probes), in the native layout's math."""
        w_in, w_out = self.native_weights()
        return activate(x_ND @ w_in[expert].to(x_ND.dtype), self.activation) @ w_out[expert].to(x_ND.dtype)


def _expert_params(module: MegablocksExperts) -> dict[str, str]:
    """MegaBlocks parameter name (w1/v1/w2) -> its name inside `module.mlp`."""
    return {
        name.rsplit(".", 1)[-1]: name
        for name, _ in module.mlp.named_parameters()
        if name.rsplit(".", 1)[-1] in _MB_KEYS
    }


def _to_native_state(module: MegablocksExperts, state: dict, prefix: str, local_metadata: Any) -> None:
    names = _expert_params(module)
    weights = {k: state.pop(f"{prefix}mlp.{n}") for k, n in names.items()}
    for name in [k for k in state if k.startswith(f"{prefix}mlp.")]:
        raise RuntimeError(
            f"{name}: MegaBlocks expert state without a native counterpart "
            "(biases or expert parallelism are not supported by backend=megablocks)"
        )
    state[f"{prefix}w_in"], state[f"{prefix}w_out"] = megablocks_to_native(weights, module.num_experts)


def _from_native_state(module: MegablocksExperts, state: dict, prefix: str, *args: Any) -> None:
    if f"{prefix}w_in" not in state:
        return  # a partial or MegaBlocks-layout state: let load_state_dict report what is missing
    w_in, w_out = state.pop(f"{prefix}w_in"), state.pop(f"{prefix}w_out")
    for key, value in native_to_megablocks(w_in, w_out, module.activation).items():
        state[f"{prefix}mlp.{_expert_params(module)[key]}"] = value


__all__ = [
    "BackendUnavailable",
    "MegablocksExperts",
    "megablocks_arguments",
    "megablocks_to_native",
    "native_to_megablocks",
    "require_megablocks",
]
