"""A small decoder-only transformer LM whose FFN is the MoE layer or the dense MLP.

RMSNorm, rotary positions, causal attention through `scaled_dot_product_attention`, SwiGLU.
The MoE model and its dense twin are built from one `ModelConfig` and differ only in the FFN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from moe.experts import DenseMLP
from moe.layer import MoEConfig, MoELayer, build_moe_layer
from moe.routers import RouterConfig
from moe.routing import RouteKeys, Routing
from moe.sizing import dense_twin_width, layer_size
from moe.validation import check_choice

FFN_KINDS = ("moe", "dense")


@dataclass
class ModelConfig:
    """Transformer sizes (Hydra group `model`). The vocabulary size comes from the data."""

    # moe: an MoE layer in every `moe_every`-th block (the others dense, active-matched);
    # dense: every block dense with hidden width `dense_width`.
    ffn: str = "moe"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    moe_every: int = 1
    # Hidden width of dense blocks; null = the active-matched width k*f (+ shared experts).
    dense_width: int | None = None
    moe: MoEConfig = field(default_factory=MoEConfig)
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool = True

    def validate(self) -> None:
        if self.ffn not in FFN_KINDS:
            check_choice("model.ffn", self.ffn, FFN_KINDS)
        for name in ("d_model", "n_layers", "n_heads", "moe_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"model.d_model={self.d_model} must be a multiple of 2*n_heads "
                f"(n_heads={self.n_heads}) for rotary embeddings"
            )
        self.moe.validate()

    def is_moe_layer(self, layer: int) -> bool:
        return self.ffn == "moe" and (layer + 1) % self.moe_every == 0

    @property
    def resolved_dense_width(self) -> int:
        return self.dense_width if self.dense_width is not None else dense_twin_width(self.moe, "active")


def dense_twin(cfg: ModelConfig, match: str) -> ModelConfig:
    """The dense twin of an MoE model: same everything, every FFN dense with the matched width
    (`active`: k*f + shared; `total`: E*f + shared). See `moe.sizing.dense_twin_width`."""
    return dataclasses.replace(cfg, ffn="dense", dense_width=dense_twin_width(cfg.moe, match))


class RotaryEmbedding(nn.Module):
    inv_freq: Tensor  # [d/2] buffer

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x_BHSd: Tensor) -> Tensor:
        seq = torch.arange(x_BHSd.shape[-2], device=x_BHSd.device, dtype=torch.float32)
        angles = torch.outer(seq, self.inv_freq)  # [S, d/2]
        cos, sin = angles.cos().to(x_BHSd.dtype), angles.sin().to(x_BHSd.dtype)
        x1, x2 = x_BHSd[..., 0::2], x_BHSd[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return rotated.flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, out_std: float):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rope = RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.rope_theta)
        nn.init.normal_(self.qkv.weight, std=cfg.init_std)
        nn.init.normal_(self.proj.weight, std=out_std)

    def forward(self, x_BSD: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x_BSD), "b s (three h d) -> three b h s d", three=3, h=self.n_heads)
        y = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True)
        return self.proj(rearrange(y, "b h s d -> b s (h d)"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, layer: int, backend: str = "native"):
        super().__init__()
        # GPT-2: residual output projections scaled by 1/sqrt(2 * n_layers).
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg, out_std)
        self.ffn_norm = nn.RMSNorm(cfg.d_model)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn: MoELayer | DenseMLP = (
            build_moe_layer(backend, cfg.d_model, cfg.moe, router_cfg, cfg.init_std, out_std)
            if self.is_moe
            else DenseMLP(cfg.d_model, cfg.resolved_dense_width, cfg.moe.activation, cfg.init_std, out_std)
        )

    def forward(self, x_BSD: Tensor, keys: RouteKeys) -> tuple[Tensor, Routing | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        if self.is_moe:
            h, routing = self.ffn(self.ffn_norm(x_BSD), keys)
        else:
            h, routing = self.ffn(self.ffn_norm(x_BSD)), None
        return x_BSD + h, routing


class BlockList(Protocol):
    """What `LanguageModel.blocks` is to a type checker: an nn.ModuleList of `Block`s (torch types
    the items of an nn.ModuleList as Module)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Block]: ...

    def __getitem__(self, index: int) -> Block: ...


@dataclass(frozen=True)
class LMOutput:
    """logits [B, S, V]; token_loss [B, S] (nats, None without targets); loss = its mean;
    routings: one record per MoE layer, in depth order (empty for a dense model)."""

    logits: Tensor
    token_loss: Tensor | None
    loss: Tensor | None
    routings: list[Routing]

    def require_token_loss(self) -> Tensor:
        """`token_loss` [B, S] of a forward given targets; ValueError for one without."""
        if self.token_loss is None:
            raise ValueError("no token loss: the forward was given no targets")
        return self.token_loss


class LanguageModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, vocab_size: int, router_cfg: RouterConfig | None = None, backend: str = "native"
    ):
        """`backend`: native | megablocks, the MoE layers' expert computation (`moe.layer.build_moe_layer`)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.blocks = cast(
            BlockList, nn.ModuleList(Block(cfg, router_cfg or RouterConfig(), i, backend) for i in range(cfg.n_layers))
        )
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=cfg.init_std)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(self, tokens_BS: Tensor, targets_BS: Tensor | None = None, domain_BS: Tensor | None = None) -> LMOutput:
        """tokens_BS, targets_BS [B, S] int64; domain_BS [B, S] the tokens' domain labels, read only
        by router=domain (the positive control; learned routers never see it)."""
        x, keys = self.embed_tokens(tokens_BS, domain_BS)
        return self.forward_from(0, x, keys, targets_BS)

    def embed_tokens(self, tokens_BS: Tensor, domain_BS: Tensor | None = None) -> tuple[Tensor, RouteKeys]:
        """The hidden state entering block 0 [B, S, D] and the routing keys of the tokens."""
        return self.embed(tokens_BS), RouteKeys.from_tokens(tokens_BS, domain_BS)

    def run_blocks(self, start: int, stop: int, x_BSD: Tensor, keys: RouteKeys) -> tuple[Tensor, list[Routing]]:
        """Blocks [start, stop) on the hidden state entering block `start` [B, S, D] -> the state
        entering block `stop` and the routing records of the MoE blocks among them."""
        routings = []
        for block in list(self.blocks)[start:stop]:
            x_BSD, routing = block(x_BSD, keys)
            if routing is not None:
                routings.append(routing)
        return x_BSD, routings

    def forward_from(self, start: int, x_BSD: Tensor, keys: RouteKeys, targets_BS: Tensor | None = None) -> LMOutput:
        """The forward from block `start` on, given the hidden state entering it [B, S, D] (as
        `run_blocks` or `embed_tokens` left it); `routings` holds the MoE blocks from `start` on.
        The analysis re-runs only the blocks after an intervention this way."""
        x_BSD, routings = self.run_blocks(start, len(self.blocks), x_BSD, keys)
        logits = self.head(self.norm(x_BSD))
        if targets_BS is None:
            return LMOutput(logits, None, None, routings)
        token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets_BS.flatten(), reduction="none")
        token_loss = token_loss.view_as(targets_BS)
        return LMOutput(logits, token_loss, token_loss.mean(), routings)


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    active_params: int  # per token
    embedding_params: int
    flops_per_token: int  # forward, incl. attention scores at the given sequence length

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def model_size(model: LanguageModel, seq_len: int) -> ModelSize:
    """Parameters (total, active per token) and forward FLOPs/token (Kaplan et al. 2020:
    2 * non-embedding active params + 2 * n_layers * seq_len * d_model for attention scores,
    + 2 * d_model * vocab for the output head)."""
    total = sum(p.numel() for p in model.parameters())
    ffn_total = ffn_active = 0
    for block in model.blocks:
        size = layer_size(block.ffn)
        ffn_total += size.total_params
        ffn_active += size.active_params
    embedding = model.embed.weight.numel()
    active = total - ffn_total + ffn_active
    d = model.cfg.d_model
    non_embedding_active = active - embedding - (0 if model.cfg.tie_embeddings else model.head.weight.numel())
    flops = 2 * non_embedding_active + 2 * model.cfg.n_layers * seq_len * d + 2 * d * model.vocab_size
    return ModelSize(total, active, embedding, flops)
