"""`moe-export`: write a trained native MoE as a Hugging Face `transformers` checkpoint, in the family
that computes exactly what it computes (same logits, same routing), or refuse and say why.

    moe-export run_dir=outputs/2026-11-28/10-00-00 out_dir=exports/my-moe     # model=moe, family=auto
    export_hf("outputs/2026-11-28/10-00-00", "exports/my-moe")               # or export_hf(model, ...)
    AutoModelForCausalLM.from_pretrained("exports/my-moe")                    # then, anywhere
    moe-analyze model=hf:exports/my-moe data=...                              # the same analysis

The family follows from the router, the shared experts and where the dense blocks are:

    router (moe.routing)      shared experts   MoE blocks                family (config.model_type)
    topk, renormalized        none             every block               Mixtral    (mixtral)
    topk / switch, either     any              every m-th block          Qwen2-MoE  (qwen2_moe)
    sigmoid + aux-free bias   any              all after the first dense GLM-4-MoE  (glm4_moe)

Tensor by tensor (ours -> HF, D model dim, F expert width, E experts, h heads of width d = D/h):
    embed.weight / head.weight / norm.weight  -> model.embed_tokens / lm_head / model.norm (tied when ours are)
    blocks.i.attn_norm, ffn_norm              -> model.layers.i.input_layernorm, post_attention_layernorm
    blocks.i.attn.qkv [3D, D]                 -> q_proj, k_proj, v_proj (rows D each; q and k rows permuted
                                                 per head, below); attn.proj -> o_proj
    router.weight [E, D]                      -> mlp.gate.weight
    router.expert_bias [E] (router=sigmoid)   -> mlp.gate.e_score_correction_bias
    experts.w_in [E, D, 2F] (gate | up)       -> mlp.experts.gate_up_proj [E, 2F, D] (transposed)
    experts.w_out [E, F, D]                   -> mlp.experts.down_proj [E, D, F]
    shared.w_in / w_out, dense ffn.w_in/w_out -> (shared_expert(s) | mlp).gate_proj, up_proj, down_proj

What makes each mapping exact, not approximate:
- Rotary positions: ours rotates interleaved pairs (2i, 2i+1) of each head, HF the halves (i, i + d/2),
  with the same frequencies. The q and k rows of each head are reordered (even dims, then odd ones),
  the same permutation on both, so every attention score is unchanged.
- RMSNorm: ours is `nn.RMSNorm(eps=None)`, whose eps is float32's machine epsilon; the config's
  `rms_norm_eps` is that number.
- Qwen2-MoE scales its shared expert by sigmoid(shared_expert_gate . x); ours is ungated. The gate's
  weight is 0 (sigmoid(0) = 0.5 exactly) and the shared down projection is doubled (exact in binary
  floating point), so 0.5 * (2 W) h = W h bit for bit. No shared expert: width 0 (it adds 0).
- GLM-4-MoE routes as DeepSeek-V3 (`noaux_tc`: sigmoid scores, experts chosen by score + correction
  bias, weighted by score) with n_group = topk_group = 1 (no groups, as ours), routed_scaling_factor
  1, norm_topk_prob = our renormalize (HF adds 1e-20 to the denominator: no effect unless the chosen
  sigmoids sum below ~1e-13), and ordinary attention. No shared experts: n_shared_experts = 0.

Refused, with the reason named (`ExportError`): routers no family has (expert_choice, hash,
prev_hash, domain, random), a capacity factor (no family drops tokens), GELU experts (every family
is SwiGLU), a dense model, MoE/dense block patterns the family cannot place, and the families whose
attention differs from ours: OLMoE and Qwen3-MoE (they always normalize queries and keys), DeepSeek-V2
and -V3 (multi-head latent attention: a low-rank, RMS-normalized key/value latent and one rotary key
shared by all heads). A DeepSeek-V3-style model (router=sigmoid) exports as glm4_moe instead.

Unless `verify=False`, the HF model built is run beside the native one on random tokens before
anything is written, and the export stops if their logits differ beyond float32 rounding.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from analysis.cli import check_run_dir, register_app_configs
from analysis.hf.adapter import DTYPES, _import_transformers
from analysis.hf.families import decoder_layers, module_attr
from moe.config import config_object, reject_unknown_keys
from moe.experts import DenseMLP, GroupedExperts
from moe.layer import MoELayer
from moe.model import LanguageModel
from moe.modes import eval_mode
from moe.routers import LearnedRouter
from moe.routers.sigmoid import SigmoidBiasRouter
from moe.validation import check_choice

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "EXPORT_FAMILIES",
    "ExportConfig",
    "ExportError",
    "ExportPlan",
    "ExportResult",
    "build_hf_model",
    "export_hf",
    "plan_export",
]

EXPORT_FAMILIES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "glm4_moe": "GLM-4-MoE"}
_MLA = (
    "uses multi-head latent attention (a low-rank, RMS-normalized key/value latent and one rotary key "
    "shared by all heads), which cannot express ordinary multi-head attention"
)
# Families the analysis reads (analysis.hf.families) whose attention differs from ours in every setting.
UNEXPRESSIBLE = {
    "olmoe": "OLMoE always normalizes queries and keys (q_norm, k_norm over the projections); this model's "
    "attention does not. Its routing rule (softmax top-k, not renormalized) exports exactly as qwen2_moe "
    "with norm_topk_prob=false",
    "qwen3_moe": "Qwen3-MoE always normalizes each head's queries and keys (q_norm, k_norm); this model's "
    "attention does not. Its routing rule exports as qwen2_moe (or mixtral)",
    "deepseek_v2": f"DeepSeek-V2 {_MLA}",
    "deepseek_v3": f"DeepSeek-V3 {_MLA}. Its routing rule (sigmoid scores + correction bias, shared experts, dense "
    "first layers) with ordinary attention is GLM-4-MoE's: export router=sigmoid models as glm4_moe",
}
# max_position_embeddings when the run's sequence length is unknown: plain RoPE has no maximum (the
# logits do not depend on it); generation defaults and caches read it.
DEFAULT_MAX_POSITIONS = 2048
_VERIFY_SHAPE = (2, 16)


class ExportError(ValueError):
    """The model cannot be written in the asked (or any) family; the message lists every reason."""


@dataclass(frozen=True)
class ExportPlan:
    """What the exported config needs to know of the native model.

    model_type: the family (a key of EXPORT_FAMILIES); reason: why that family;
    moe_blocks: per block, whether its FFN is the MoE layer; widths are hidden widths (0 = none)."""

    model_type: str
    reason: str
    num_experts: int
    top_k: int
    expert_width: int
    shared_width: int
    dense_width: int
    renormalize: bool
    moe_blocks: tuple[bool, ...]

    @property
    def first_dense(self) -> int:
        """Leading dense blocks (GLM-4-MoE / DeepSeek's first_k_dense_replace)."""
        return self.moe_blocks.index(True)


@dataclass(frozen=True)
class ExportResult:
    """out_dir: the checkpoint; model_type / family: the family written; reason: why it;
    tokenizer: whether a tokenizer was saved beside the weights; max_logit_diff: the largest
    |logit difference| of the verification (None when not verified)."""

    out_dir: Path
    model_type: str
    family: str
    reason: str
    tokenizer: bool
    max_logit_diff: float | None


# ----------------------------------------------------------------------------- which family
_ROUTER_REFUSALS = {
    "expert_choice": "router=expert_choice: each expert picks its tokens across the whole batch (a token gets 0..E "
    "experts); in every transformers MoE family each token picks its own top-k experts",
    "hash": "router=hash: experts are a fixed hash of the token id, not a learned gate; no transformers family "
    "routes by token id",
    "prev_hash": "router=prev_hash: experts are a fixed hash of the previous token id, not a learned gate; no "
    "transformers family routes that way",
    "domain": "router=domain reads each token's domain label, which a language model's input does not carry",
    "random": "router=random draws experts at random on every forward; no transformers family does",
}


def plan_export(model: LanguageModel, family: str | None = None) -> ExportPlan:
    """The family `model` exports to (`family`, or chosen by the table of the module docstring);
    ExportError listing every reason when it cannot be written exactly."""
    if not isinstance(model, LanguageModel):
        raise TypeError(f"export_hf exports a moe.model.LanguageModel, got {type(model).__name__}")
    if family is not None and family in UNEXPRESSIBLE:
        raise ExportError(f"cannot export as {family}: {UNEXPRESSIBLE[family]}")
    if family is not None and family not in EXPORT_FAMILIES:
        raise ExportError(
            f"family={family!r} is unknown; exportable families: {', '.join(EXPORT_FAMILIES)} "
            "(or none, to choose by the router)"
        )
    cfg = model.cfg
    layers = model.moe_layers
    if not layers:
        raise ExportError(
            f"the model has no MoE layer (model.ffn={cfg.ffn!r}): export the MoE model of the run "
            "(model=moe); a dense twin is no MoE family's"
        )
    if not all(isinstance(layer, MoELayer) and isinstance(layer.experts, GroupedExperts) for layer in layers):
        raise ExportError(
            "cannot export: the MoE layers' experts are not the native backend's "
            "(moe.experts.GroupedExperts); load the checkpoint with backend=native "
            "(moe.loading.load_model does)"
        )
    problems = []
    moe_cfg = cfg.moe
    router = layers[0].router
    kind = "topk" if router.kind == "switch" else router.kind  # Switch: top-1 softmax, not renormalized
    if kind in _ROUTER_REFUSALS:
        problems.append(_ROUTER_REFUSALS[kind])
    elif kind not in ("topk", "sigmoid"):
        problems.append(f"router {kind} is not one this export knows")
    if moe_cfg.capacity_factor is not None:
        problems.append(
            f"model.moe.capacity_factor={moe_cfg.capacity_factor}: overflow tokens are dropped, and no "
            "transformers family drops tokens; export a dropless model (capacity_factor=null)"
        )
    if moe_cfg.activation != "swiglu":
        problems.append(
            f"model.moe.activation={moe_cfg.activation!r}: every transformers MoE family uses SwiGLU "
            "experts (silu(gate) * up)"
        )
    if problems:
        raise ExportError("cannot export: " + "; ".join(problems))
    renormalize = bool(router.renormalize)
    shared = moe_cfg.num_shared_experts * moe_cfg.routed_width
    moe_blocks = tuple(bool(block.is_moe) for block in model.blocks)
    if family is None:
        if kind == "sigmoid":
            family, reason = (
                "glm4_moe",
                (
                    "sigmoid scores with the aux-loss-free bias: DeepSeek-V3's rule, which "
                    "GLM-4-MoE runs with ordinary attention"
                ),
            )
        elif renormalize and not shared and all(moe_blocks):
            family, reason = "mixtral", "softmax top-k renormalized, no shared experts, every block MoE"
        else:
            what = [f"softmax top-k {'renormalized' if renormalize else 'not renormalized'}"]
            if shared:
                what.append(f"{moe_cfg.num_shared_experts} shared expert(s)")
            if not all(moe_blocks):
                what.append(f"an MoE layer in every {cfg.moe_every}-th block")
            family, reason = "qwen2_moe", ", ".join(what)
    else:
        reason = "asked for"
    why_not = _misfits(family, kind, renormalize, shared, moe_blocks, moe_cfg.routed_experts, cfg.moe_every)
    if why_not:
        raise ExportError(f"cannot export as {family} ({EXPORT_FAMILIES[family]}): " + "; ".join(why_not))
    return ExportPlan(
        family,
        reason,
        moe_cfg.routed_experts,
        moe_cfg.routed_top_k,
        moe_cfg.routed_width,
        shared,
        cfg.resolved_dense_width,
        renormalize,
        moe_blocks,
    )


def _misfits(
    family: str,
    kind: str,
    renormalize: bool,
    shared: int,
    moe_blocks: tuple[bool, ...],
    num_experts: int,
    moe_every: int,
) -> list[str]:
    out = []
    if family in ("mixtral", "qwen2_moe") and kind != "topk":
        out.append(f"its gate is a softmax top-k; this model's router is {kind}")
    if family == "glm4_moe" and kind != "sigmoid":
        out.append(f"its gate is sigmoid scores + correction bias (router=sigmoid); this model's router is {kind}")
    if family == "mixtral":
        if not renormalize:
            out.append("Mixtral always renormalizes the top-k weights; this router does not (router.renormalize=false)")
        if shared:
            out.append("Mixtral has no shared experts")
        if not all(moe_blocks):
            out.append(f"every Mixtral block is MoE; this model has dense blocks (moe_every={moe_every})")
    if family == "glm4_moe":
        k = moe_blocks.index(True)
        if not all(moe_blocks[k:]):
            out.append(
                f"dense blocks can only come first (first_k_dense_replace); this model's MoE blocks are "
                f"{[i for i, m in enumerate(moe_blocks) if m]} of {len(moe_blocks)}"
            )
        if num_experts < 2:
            out.append("its gate scores experts by their top-2 scores, so it needs at least 2 experts")
    return out


# ----------------------------------------------------------------------------- config and tensors
def hf_config(
    model: LanguageModel,
    plan: ExportPlan,
    *,
    max_position_embeddings: int = DEFAULT_MAX_POSITIONS,
    eos_token_id: int | None = None,
) -> Any:
    """The transformers config of `plan` (field names as in transformers 5's configuration_<family>.py)."""
    transformers = _import_transformers()
    cfg = model.cfg
    common: dict[str, Any] = dict(
        vocab_size=model.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        initializer_range=cfg.init_std,
        rms_norm_eps=torch.finfo(torch.float32).eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        num_experts_per_tok=plan.top_k,
    )
    extra: dict[str, Any]
    if plan.model_type == "mixtral":
        extra = dict(
            num_local_experts=plan.num_experts,
            intermediate_size=plan.expert_width,
            head_dim=cfg.d_model // cfg.n_heads,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    elif plan.model_type == "qwen2_moe":
        extra = dict(
            num_experts=plan.num_experts,
            moe_intermediate_size=plan.expert_width,
            shared_expert_intermediate_size=plan.shared_width,
            intermediate_size=plan.dense_width,
            norm_topk_prob=plan.renormalize,
            decoder_sparse_step=model.cfg.moe_every,
            mlp_only_layers=[],
            qkv_bias=False,
            use_sliding_window=False,
        )
    else:  # glm4_moe
        extra = dict(
            n_routed_experts=plan.num_experts,
            moe_intermediate_size=plan.expert_width,
            n_shared_experts=plan.shared_width // plan.expert_width,
            intermediate_size=plan.dense_width,
            first_k_dense_replace=plan.first_dense,
            n_group=1,
            topk_group=1,
            norm_topk_prob=plan.renormalize,
            routed_scaling_factor=1.0,
            use_qk_norm=False,
            attention_bias=False,
            num_mtp_layers=0,
        )
        extra["rope_parameters"] = {**common["rope_parameters"], "partial_rotary_factor": 1.0}
    config = transformers.AutoConfig.for_model(plan.model_type, **{**common, **extra})
    moe_blocks = tuple(_hf_is_moe(config, plan.model_type, i) for i in range(cfg.n_layers))
    if moe_blocks != plan.moe_blocks:  # a transformers release that places MoE blocks otherwise
        raise ExportError(
            f"the {plan.model_type} config places MoE blocks at {moe_blocks}, this model at {plan.moe_blocks}"
        )
    return config


def _hf_is_moe(config: Any, model_type: str, i: int) -> bool:
    if model_type == "mixtral":
        return True
    if model_type == "qwen2_moe":
        return i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0
    return i >= config.first_k_dense_replace


def _rope_rows(w_RD: Tensor, n_heads: int) -> Tensor:
    """q or k projection rows [h*d, D]: each head's interleaved rotary pairs (2i, 2i+1) reordered to
    HF's halves (i, i + d/2): even dims first, then odd ones."""
    d = w_RD.shape[0] // n_heads
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    return w_RD.view(n_heads, d, -1)[:, perm].reshape(w_RD.shape)


def _mlp(prefix: str, mlp: DenseMLP | None, d_model: int, down_scale: float = 1.0) -> dict[str, Tensor]:
    """A SwiGLU MLP's three projections; `mlp` None: the width-0 one that stands for no shared expert."""
    if mlp is None:
        return {
            f"{prefix}.gate_proj.weight": torch.zeros(0, d_model),
            f"{prefix}.up_proj.weight": torch.zeros(0, d_model),
            f"{prefix}.down_proj.weight": torch.zeros(d_model, 0),
        }
    gate, up = mlp.w_in.chunk(2, dim=-1)  # [D, F] each
    return {
        f"{prefix}.gate_proj.weight": gate.t(),
        f"{prefix}.up_proj.weight": up.t(),
        f"{prefix}.down_proj.weight": mlp.w_out.t() * down_scale,
    }


def hf_state_dict(model: LanguageModel, plan: ExportPlan, hf_model: torch.nn.Module) -> dict[str, Tensor]:
    """`model`'s tensors under the HF model's parameter names, in its layouts (module docstring)."""
    d, h = model.cfg.d_model, model.cfg.n_heads
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = model.head.weight
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}"
        qkv = block.attn.qkv.weight
        out.update(
            {
                f"{p}.input_layernorm.weight": block.attn_norm.weight,
                f"{p}.post_attention_layernorm.weight": block.ffn_norm.weight,
                f"{p}.self_attn.q_proj.weight": _rope_rows(qkv[:d], h),
                f"{p}.self_attn.k_proj.weight": _rope_rows(qkv[d : 2 * d], h),
                f"{p}.self_attn.v_proj.weight": qkv[2 * d :],
                f"{p}.self_attn.o_proj.weight": block.attn.proj.weight,
            }
        )
        layer = block.ffn
        if isinstance(layer, DenseMLP):
            out.update(_mlp(f"{p}.mlp", layer, d))
            continue
        experts, router = layer.experts, layer.router
        if not isinstance(experts, GroupedExperts) or not isinstance(router, LearnedRouter):
            raise ExportError(f"block {i}: native experts and a learned router are needed (see plan_export)")
        hf_experts = module_attr(module_attr(decoder_layers(hf_model)[i], "mlp"), "experts")
        w_in: Tensor = experts.w_in  # [E, D, 2F]
        w_out: Tensor = experts.w_out  # [E, F, D]
        if not getattr(hf_experts, "is_transposed", False):  # transformers 5: [E, 2F, D], [E, D, F]
            w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
        out.update(
            {
                f"{p}.mlp.gate.weight": router.weight,
                f"{p}.mlp.experts.gate_up_proj": w_in,
                f"{p}.mlp.experts.down_proj": w_out,
            }
        )
        if plan.model_type == "glm4_moe":
            if not isinstance(router, SigmoidBiasRouter):
                raise ExportError(f"block {i}: glm4_moe takes the sigmoid router's correction bias (see plan_export)")
            out[f"{p}.mlp.gate.e_score_correction_bias"] = router.expert_bias
            out.update(_mlp(f"{p}.mlp.shared_experts", layer.shared, d))
        elif plan.model_type == "qwen2_moe":
            # sigmoid(0) = 0.5 exactly, and doubling is exact: the gated shared expert equals ours.
            out[f"{p}.mlp.shared_expert_gate.weight"] = torch.zeros(1, d)
            out.update(_mlp(f"{p}.mlp.shared_expert", layer.shared, d, down_scale=2.0))
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def build_hf_model(
    model: LanguageModel,
    family: str | None = None,
    *,
    max_position_embeddings: int = DEFAULT_MAX_POSITIONS,
    eos_token_id: int | None = None,
):
    """(HF model in float32 and eval mode holding `model`'s weights, its ExportPlan). Nothing is written."""
    transformers = _import_transformers()
    plan = plan_export(model, family)
    config = hf_config(model, plan, max_position_embeddings=max_position_embeddings, eos_token_id=eos_token_id)
    with warnings.catch_warnings():  # a width-0 shared expert (none) is a zero-element tensor to initialize
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = hf_state_dict(model, plan, hf_model)
    expected = set(hf_model.state_dict())
    if model.cfg.tie_embeddings:
        expected.discard("lm_head.weight")  # the embedding, tied
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:  # a transformers release that names or places tensors otherwise
        raise ExportError(
            f"the {plan.model_type} model of transformers {transformers.__version__} does not take "
            f"this mapping: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    hf_model.load_state_dict(state, strict=False)
    tied = hf_model.get_output_embeddings().weight is hf_model.get_input_embeddings().weight
    if model.cfg.tie_embeddings and not tied:
        raise ExportError(f"the {plan.model_type} model did not tie its output head to the embeddings")
    return hf_model.eval(), plan


@torch.no_grad()
def _verify(model: LanguageModel, hf_model: torch.nn.Module, plan: ExportPlan) -> float:
    """Max |logit difference| of both models on random tokens; ExportError beyond float32 rounding."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, _VERIFY_SHAPE, generator=g)
    device = next(model.parameters()).device
    with eval_mode(model):
        ours = model(tokens.to(device)).logits.float().cpu()
    theirs = hf_model(input_ids=tokens, use_cache=False).logits.float()
    diff = float((ours - theirs).abs().max())
    tolerance = 1e-4 * max(1.0, float(ours.abs().max()))
    if not diff <= tolerance:
        version = _import_transformers().__version__
        raise ExportError(
            f"the exported {plan.model_type} model's logits differ from the native model's by {diff:.3g} "
            f"(tolerance {tolerance:.3g}) under transformers {version}: this release computes the "
            "family differently; nothing was written"
        )
    return diff


# ----------------------------------------------------------------------------- writing
def _save_tokenizer(tokenizer: Any, out: Path) -> bool:
    """Save the run's tokenizer for `AutoTokenizer`; False for the synthetic id tokenizer (no text)."""
    from moe.data.tokenizer import EOS, BPETokenizer, PretrainedTokenizer

    if isinstance(tokenizer, BPETokenizer):
        fast = _import_transformers().PreTrainedTokenizerFast(tokenizer_object=tokenizer._tok, eos_token=EOS)
        fast.save_pretrained(str(out))
        return True
    if isinstance(tokenizer, PretrainedTokenizer):
        tokenizer._tok.save_pretrained(str(out))
        return True
    return False


def _cast(hf_model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """`hf_model` in `dtype`, except the tensors its family keeps in float32 whatever the dtype
    (`_keep_in_fp32_modules_strict`; GLM-4-MoE: the correction bias, which decides the routing, and
    in recent releases the gate weight)."""
    keep = tuple(getattr(hf_model, "_keep_in_fp32_modules_strict", None) or ())
    # transformers' wrapper of PreTrainedModel.to mistypes its arguments; it is nn.Module.to.
    cast(torch.nn.Module, hf_model).to(dtype)
    for name, tensor in [*hf_model.named_parameters(), *hf_model.named_buffers()]:
        if any(k in name for k in keep) and tensor.is_floating_point():
            tensor.data = tensor.data.float()
    return hf_model


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an out_dir that is a file, or a non-empty directory unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"out_dir={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"out_dir={out} exists and is not empty; pass a new directory (or overwrite=true)")


def export_hf(
    source: str | Path | LanguageModel,
    out_dir: str | Path,
    family: str | None = None,
    *,
    model: str = "moe",
    dtype: str = "float32",
    tokenizer: Any = None,
    max_position_embeddings: int | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Write `source` (a moe-train run directory, whose newest checkpoint of `model` is taken, or a
    `LanguageModel`) into `out_dir` as config.json + model.safetensors (+ generation_config.json),
    with the run's tokenizer (or `tokenizer`, a `moe.data` tokenizer) when it has one that reads text.

    family: mixtral | qwen2_moe | glm4_moe, or None to choose by the router (module docstring).
    dtype: of the saved weights (float32 | bfloat16 | float16); verification runs in float32.
    max_position_embeddings: default the run's data.seq_len (else 2048); RoPE itself has no limit.
    Raises ExportError (a ValueError) naming what does not fit, before anything is written.
    """
    check_choice("dtype", dtype, DTYPES, error=ExportError)
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    if isinstance(source, LanguageModel):
        native = source
    else:
        from moe.data import load_prepared
        from moe.loading import load_model

        run_dir = Path(source)
        native = load_model(run_dir, model, "cpu")
        if (run_dir / "data" / "manifest.json").is_file():
            prepared = load_prepared(run_dir)
            tokenizer = tokenizer if tokenizer is not None else prepared.tokenizer
            max_position_embeddings = max_position_embeddings or prepared.seq_len
    eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    hf_model, plan = build_hf_model(
        native, family, eos_token_id=eos, max_position_embeddings=max_position_embeddings or DEFAULT_MAX_POSITIONS
    )
    diff = _verify(native, hf_model, plan) if verify else None
    out.mkdir(parents=True, exist_ok=True)
    _cast(hf_model, DTYPES[dtype]).save_pretrained(str(out))  # replaces what an earlier save_pretrained wrote
    saved_tokenizer = _save_tokenizer(tokenizer, out) if tokenizer is not None else False
    return ExportResult(out, plan.model_type, EXPORT_FAMILIES[plan.model_type], plan.reason, saved_tokenizer, diff)


# ----------------------------------------------------------------------------- command line
@dataclass
class ExportConfig:
    run_dir: str | None = None  # a moe-train run directory (required)
    out_dir: str | None = None  # where the HF checkpoint goes (required; new or empty)
    model: str = "moe"  # the model of the run to export
    family: str | None = None  # mixtral | qwen2_moe | glm4_moe; null = chosen by the router
    dtype: str = "float32"  # of the saved weights: float32 | bfloat16 | float16
    verify: bool = True  # compare the HF model's logits with the native model's before writing
    overwrite: bool = False  # write into a non-empty out_dir (the checkpoint's files are replaced)


register_app_configs("export", ExportConfig)


@hydra.main(version_base="1.3", config_path=None, config_name="export")
def main(dict_cfg: DictConfig) -> None:
    reject_unknown_keys(dict_cfg, ExportConfig)
    cfg = config_object(ExportConfig, dict_cfg)
    if not cfg.run_dir or not cfg.out_dir:
        raise ValueError(
            "moe-export needs run_dir=PATH (a moe-train run directory) and out_dir=PATH (where the "
            "Hugging Face checkpoint goes)"
        )
    check_run_dir(cfg.run_dir)
    result = export_hf(
        cfg.run_dir,
        cfg.out_dir,
        cfg.family,
        model=cfg.model,
        dtype=cfg.dtype,
        verify=cfg.verify,
        overwrite=cfg.overwrite,
    )
    checked = (
        "" if result.max_logit_diff is None else f", logits within {result.max_logit_diff:.2g} of the native model"
    )
    print(
        f"exported {cfg.run_dir} ({cfg.model}) as {result.family} ({result.model_type}: {result.reason}) to "
        f"{result.out_dir}{checked}{'' if result.tokenizer else '; no tokenizer (the run has none that reads text)'}"
    )


if __name__ == "__main__":
    main()
