"""Present a `transformers` MoE model to the analysis as if it were a `moe.model.LanguageModel`.

Legend (as in `moe/`): B sequences, S positions, T = B*S tokens, D model dim, E routed experts,
K experts per token, V vocabulary, L MoE layers.

    model = load_hf_model("allenai/OLMoE-1B-7B-0924", device="cuda")   # or wrap_hf_model(hf_model)
    recording = record_routing(model, batches, num_domains=D)          # unchanged analysis code

The analysis reads a model through a small surface: `moe_layers` (each with a `router` module that
returns a `Routing` and holds `expert_mask`, `num_experts`, `top_k`; `experts.expert_forward`; a
forward pre-hook on the layer input), `blocks[i].is_moe`, `vocab_size`, and
`forward(tokens, targets) -> LMOutput` with a per-token loss. `HFMoEModel` provides it:

- Each HF gate module (`block.gate`) gets one forward hook. From the gate's input it computes the
  router logits as the gate does, then builds the layer's `Routing` from the gate's *own* decision
  (the experts and weights it returns; transformers 4.x Linear gates return only logits, and then
  the family's rule re-derives the decision the block makes from them).
- The hook passes that record through a `RouterShim`, a module whose forward returns its input.
  Forward hooks on the shim (`RoutingRecorder`, `analysis.knockout.top1_dropped`) therefore see the
  record, and may replace it, exactly as on our own routers.
- A knockout (`shim.expert_mask[e] = False`, as `analysis.knockout.expert_masked` sets it) makes
  the hook re-route with the family's rule with expert e removed from selection
  (`analysis.hf.rules`), and a replaced record (top-1 dropped) makes it zero the dropped slots'
  weights; in both cases the hook returns the gate output rewritten in the gate's own format and
  dtypes, so the HF block dispatches the changed routing. Otherwise the gate output is untouched.
- On each layer's first unmasked call the rule is checked against the gate's decision; if they
  disagree (a transformers release that routes differently) it raises rather than knock out with
  a wrong rule.
- A 4.x Linear gate returns only logits, so there a knockout masks the logit (-inf before the
  softmax; for families that do not renormalize this also rescales every other token's weights by
  1 / (1 - p_e)) and a top-1 knockout raises NotImplementedError.

Shared experts (Qwen2-MoE, DeepSeek) are outside the routing record: always on, never knocked out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.hf.families import Family, family_of, module_attr, moe_blocks, tensor_attr
from analysis.hf.rules import RoutingRule, RuleOutput
from moe.model import LMOutput
from moe.routing import Routing
from moe.validation import check_choice

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["HFExperts", "HFMoELayer", "HFMoEModel", "RouterShim", "load_hf_model", "resolve_dtype", "wrap_hf_model"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "analyzing a Hugging Face model (model=hf:<name>) needs `transformers`: "
            "pip install 'moe-specialization[hf]'"
        ) from e
    return transformers


# ----------------------------------------------------------------------------- router shim
class RouterShim(nn.Module):
    """Stands in for a `moe.routing.Router` at one HF MoE layer: `forward(routing) -> routing`.

    Holds the knockout mask `expert_mask` [E] bool (True = available; not saved) and E, K. The HF
    gate's hook calls it with the layer's `Routing`, so forward hooks registered on it see the
    record and may return a replacement, which the gate hook then applies.
    """

    expert_mask: Tensor  # [E] bool buffer

    def __init__(self, num_experts: int, top_k: int, description: str):
        super().__init__()
        self.num_experts, self.top_k, self.description = num_experts, top_k, description
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool), persistent=False)

    def forward(self, routing: Routing) -> Routing:
        return routing

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, rule={self.description!r}"


# ----------------------------------------------------------------------------- experts
class HFExperts:
    """`expert_forward(e, x [N, D]) -> [N, D]`: one routed expert of an HF MoE block, ungated
    (what `analysis.probes` compares). transformers 5.x fuses the experts into `gate_up_proj`
    [E, 2F, D] and `down_proj` [E, D, F] (transposed layouts flagged `is_transposed`); 4.x keeps a
    ModuleList of MLPs."""

    def __init__(self, experts: nn.Module, num_experts: int):
        self.module, self.num_experts = experts, num_experts

    @torch.no_grad()
    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        m = self.module
        if hasattr(m, "gate_up_proj"):
            gate_up, down = tensor_attr(m, "gate_up_proj")[expert], tensor_attr(m, "down_proj")[expert]
            if getattr(m, "is_transposed", False):
                gate_up, down = gate_up.t(), down.t()
            gate, up = F.linear(x_ND, gate_up).chunk(2, dim=-1)
            act_fn = m.act_fn
            if not callable(act_fn):
                raise TypeError(f"{type(m).__name__}.act_fn is a {type(act_fn).__name__}, not callable")
            return F.linear(act_fn(gate) * up, down)
        if not isinstance(m, nn.ModuleList):
            raise TypeError(f"{type(m).__name__}: expected fused expert weights (gate_up_proj) or a ModuleList")
        return m[expert](x_ND)


# ----------------------------------------------------------------------------- one MoE layer
@dataclass(frozen=True)
class _Layout:
    """Where a gate's decision sits in its output. A tuple holds the experts at `indices_at` and
    their weights at `weights_at` (transformers 5.x: (logits, weights, indices); DeepSeek-V3 in
    4.x: (indices, weights)); a bare tensor (`indices_at` None) is the logits of a 4.x Linear gate,
    from which the block itself routes."""

    indices_at: int | None
    weights_at: int | None


def _layout(output: Any) -> _Layout:
    if isinstance(output, Tensor):
        return _Layout(None, None)
    if isinstance(output, (tuple, list)):
        ints = [i for i, t in enumerate(output) if isinstance(t, Tensor) and not t.is_floating_point()]
        if ints:
            shape = output[ints[0]].shape
            floats = [
                i for i, t in enumerate(output) if isinstance(t, Tensor) and t.is_floating_point() and t.shape == shape
            ]
            if floats:
                return _Layout(ints[0], 1 if 1 in floats else floats[0])
    raise TypeError(
        f"unrecognized gate output {type(output).__name__}: expected router logits or a tuple "
        "holding expert indices and weights"
    )


class HFMoELayer:
    """One MoE block of an HF model with the surface of `moe.layer.MoELayer` the analysis reads:
    `router` (a `RouterShim`), `experts` (`HFExperts`), `register_forward_pre_hook` (on the
    block's input, which the gate and the experts receive)."""

    def __init__(self, block_index: int, block: nn.Module, rule: RoutingRule, router: RouterShim, owner: HFMoEModel):
        self.block_index, self.block, self.rule, self.router = block_index, block, rule, router
        self.gate = module_attr(block, "gate")
        self.experts = HFExperts(module_attr(block, "experts"), router.num_experts)
        self._owner = owner
        self._layout: _Layout | None = None
        self._verified = False
        self._handle = self.gate.register_forward_hook(self._on_gate, with_kwargs=True)

    def register_forward_pre_hook(self, hook):
        return self.block.register_forward_pre_hook(hook)

    def remove(self) -> None:
        self._handle.remove()

    # ---- the gate hook
    def _on_gate(self, gate: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        x_TD = x.reshape(-1, x.shape[-1])
        if self._layout is None:
            self._layout = _layout(output)
        layout = self._layout
        mask = self.router.expert_mask.to(x.device)
        masked = not bool(mask.all())
        if layout.indices_at is None:  # a 4.x Linear gate: the block routes from these logits
            logits = output.masked_fill(~mask, float("-inf")) if masked else output
            rule = self.rule.select(logits, None, gate)
            indices, weights = rule.indices, rule.weights
        else:
            logits = self.rule.logits(gate, x_TD)
            rule = self.rule.select(logits, mask if masked else None, gate)
            if masked:  # weights rounded as the gate rounds them, so the record is what the block uses
                indices, weights = rule.indices, rule.weights.to(output[layout.weights_at].dtype)
            else:
                indices, weights = output[layout.indices_at], output[layout.weights_at]
                if not self._verified:
                    self._verify(rule, indices, weights)
        routing = Routing(
            indices.long(),
            weights.float(),
            logits.float(),
            rule.probs,
            torch.ones(indices.shape, dtype=torch.bool, device=indices.device),
        )
        device = self.router.expert_mask.device
        if routing.indices.device != device:
            routing = Routing(
                *(getattr(routing, f.name).to(device, non_blocking=True) for f in dataclasses.fields(routing))
            )
        final = self.router(routing)
        self._owner._collect(final)
        if layout.indices_at is None:
            if final is not routing:
                raise NotImplementedError(
                    "changing single assignments (top-1 knockout) needs a gate that returns its experts and "
                    "weights (transformers >= 5); this gate returns only logits, from which its block routes"
                )
            return logits if masked else None  # the block routes from the masked logits
        if final is routing and not masked:
            return None  # the gate's output, untouched
        return self._rewrite(output, layout, final)

    @staticmethod
    def _rewrite(output: Any, layout: _Layout, routing: Routing) -> Any:
        """The gate's output with its experts and weights replaced by `routing`'s (dropped slots
        weigh 0), in the gate's own dtypes and devices."""
        indices_at, weights_at = layout.indices_at, layout.weights_at
        if indices_at is None or weights_at is None:
            raise ValueError("a gate output of bare logits holds no experts and weights to replace")
        out = list(output)
        old_i, old_w = out[indices_at], out[weights_at]
        out[indices_at] = routing.indices.to(old_i.device, old_i.dtype)
        out[weights_at] = (routing.weights * routing.kept).to(old_w.device, old_w.dtype)
        return type(output)(out)

    def _verify(self, rule: RuleOutput, indices: Tensor, weights: Tensor) -> None:
        """The rule must reproduce the gate's decision (experts as sets, weights per expert)."""
        a_idx, a_order = rule.indices.sort(dim=-1)
        b_idx, b_order = indices.long().sort(dim=-1)
        same = (a_idx == b_idx).all(dim=-1)
        a_w = rule.weights.gather(1, a_order).to(weights.dtype).float()[same]
        b_w = weights.gather(1, b_order).float()[same]
        eps = torch.finfo(weights.dtype).eps
        mismatch = 1.0 - same.float().mean().item()
        if mismatch > 1e-3 or not torch.allclose(a_w, b_w, rtol=4 * eps, atol=4 * eps):
            version = getattr(_import_transformers(), "__version__", "?")
            raise RuntimeError(
                f"the {self._owner.family.name} routing rule ({self.rule.describe()}) does not reproduce the "
                f"gate of decoder layer {self.block_index} under transformers {version} ({mismatch:.2%} of tokens "
                "choose other experts, or the weights differ); knockouts would use a wrong rule. "
                "Update analysis/hf/rules.py for this release."
            )
        self._verified = True


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class BlockInfo:
    """What the analysis asks of a block: is its FFN an MoE layer."""

    index: int
    is_moe: bool


class HFMoEModel(nn.Module):
    """A `transformers` causal-LM MoE behind the `moe.model.LanguageModel` surface (module
    docstring). Routing is recorded on every forward while the hooks are attached; `remove_hooks()`
    restores the HF model. The `RouterShim`s live on the input embeddings' device, so the routing
    records of a model sharded over devices land on one."""

    def __init__(self, hf_model: PreTrainedModel, name: str | None = None):
        super().__init__()
        self.hf = hf_model
        self.name = name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        self.family: Family = family_of(hf_model.config)
        config = hf_model.config
        embeddings = hf_model.get_input_embeddings()
        if not isinstance(embeddings, nn.Embedding):
            raise TypeError(
                f"{type(hf_model).__name__}'s input embeddings are a {type(embeddings).__name__}, not nn.Embedding"
            )
        self.vocab_size = int(embeddings.num_embeddings)
        device = embeddings.weight.device
        found = moe_blocks(hf_model)
        self._blocks = [BlockInfo(i, block is not None) for i, block in found]
        if not any(b.is_moe for b in self._blocks):
            raise ValueError(f"{self.name} ({type(hf_model).__name__}) has no MoE layer")
        rule = self.family.rule(config)
        shims, layers = [], []
        self._routings: list[Routing] | None = None
        for i, block in found:
            if block is None:
                continue
            num_experts = int(tensor_attr(module_attr(block, "gate"), "weight").shape[0])
            shim = RouterShim(num_experts, rule.top_k, rule.describe()).to(device)
            shims.append(shim)
            layers.append(HFMoELayer(i, block, rule, shim, self))
        self.routers = nn.ModuleList(shims)
        self._layers = layers
        self.rule = rule

    @property
    def moe_layers(self) -> list[HFMoELayer]:
        return list(self._layers)

    @property
    def blocks(self) -> list[BlockInfo]:
        return list(self._blocks)

    def remove_hooks(self) -> None:
        for layer in self._layers:
            layer.remove()

    def _collect(self, routing: Routing) -> None:
        if self._routings is not None:
            self._routings.append(routing)

    def forward(self, tokens_BS: Tensor, targets_BS: Tensor | None = None, domain_BS: Tensor | None = None) -> LMOutput:
        """domain_BS is accepted for the `LanguageModel` signature and unused (HF routers never see it).
        logits [B, S, V] in the model's dtype; token_loss [B, S] next-token loss (nats, float32,
        computed one row at a time to bound the float32 copy of the logits, on the tokens' device);
        routings: the `Routing` of each MoE layer in depth order, as dispatched."""
        self._routings = []
        try:
            logits = self.hf(input_ids=tokens_BS, use_cache=False).logits
        finally:
            routings, self._routings = self._routings, None
        if targets_BS is None:
            return LMOutput(logits, None, None, routings)
        targets = targets_BS.to(logits.device)
        token_loss = torch.stack(
            [F.cross_entropy(logits[b].float(), targets[b], reduction="none") for b in range(logits.shape[0])]
        ).to(tokens_BS.device)
        return LMOutput(logits, token_loss, token_loss.mean(), routings)

    def describe(self) -> dict[str, Any]:
        """The model's entries of summary.json's `model` (see `analysis.report.analyze_model`)."""
        config = self.hf.config
        param = next(self.hf.parameters())
        return {
            "name": self.name,
            "family": self.family.name,
            "model_type": config.model_type,
            "router": f"{self.family.name}: {self.rule.describe()}",
            "shared_experts": self.family.shared(config),
            "num_layers": len(self._blocks),
            "total_params": int(sum(p.numel() for p in self.hf.parameters())),
            "dtype": str(param.dtype).removeprefix("torch."),
            "transformers": getattr(_import_transformers(), "__version__", None),
        }


def wrap_hf_model(hf_model: PreTrainedModel, name: str | None = None) -> HFMoEModel:
    """Attach the routing adapter to an already loaded HF MoE model (put it in eval mode)."""
    return HFMoEModel(hf_model, name).eval()


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """auto: bfloat16 on CUDA, float32 elsewhere; else one of float32, bfloat16, float16."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith(("cuda", "auto")) else torch.float32
    if dtype not in DTYPES:
        check_choice("dtype", dtype, ("auto", *DTYPES))
    return DTYPES[dtype]


def load_hf_model(name: str, *, device: str = "cpu", dtype: str = "auto", revision: str | None = None) -> HFMoEModel:
    """`AutoModelForCausalLM.from_pretrained(name)` (a Hub name or a local directory) in eval mode,
    on `device` (cpu, cuda, cuda:1; `auto` shards over every GPU and needs `accelerate`) with the
    adapter attached. dtype: see `resolve_dtype`."""
    transformers = _import_transformers()
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    # transformers renamed `torch_dtype` to `dtype` in 4.56.
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = torch_dtype
    try:
        import accelerate  # noqa: F401  (lets from_pretrained place weights straight on the device)

        has_accelerate = True
    except ImportError:
        has_accelerate = False
    if device == "auto" and not has_accelerate:
        raise ImportError("device=auto shards the model over the GPUs with `accelerate`: pip install accelerate")
    if has_accelerate and device != "cpu":
        kwargs["device_map"] = device
    config = transformers.AutoConfig.from_pretrained(name, revision=revision)
    family_of(config)  # fail before downloading weights of an unsupported model
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if "device_map" not in kwargs:
        hf_model = hf_model.to(device)
    return wrap_hf_model(hf_model, name)
