"""The unit the trainer consumes: tokens with their next-token targets and per-token labels.

Legend: B sequences per (micro) batch, S tokens per sequence (`seq_len`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Batch:
    """Four int64 tensors of shape [B, S].

    tokens[b, s]  input token id
    targets[b, s] the next token of the stream (= tokens[b, s + 1] inside a row)
    domain[b, s]  index into `PreparedData.domains` of the document tokens[b, s] belongs to
    doc[b, s]     corpus-wide document id of tokens[b, s]; an EOS belongs to the document it ends
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    domain: torch.Tensor
    doc: torch.Tensor

    def __post_init__(self) -> None:
        shape = self.tokens.shape
        for name in ("targets", "domain", "doc"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"Batch.{name} has shape {tuple(getattr(self, name).shape)}, tokens {tuple(shape)}")

    @classmethod
    def from_numpy(cls, window_BS1: np.ndarray, domain_BS: np.ndarray, doc_BS: np.ndarray) -> Batch:
        """Build from a token window [B, S+1] (inputs = [:, :-1], targets = [:, 1:]) and labels [B, S]."""
        window = torch.from_numpy(np.ascontiguousarray(window_BS1, dtype=np.int64))
        return cls(
            # Contiguous copies: views of one window would surprise code that calls .view() on them.
            tokens=window[:, :-1].contiguous(),
            targets=window[:, 1:].contiguous(),
            domain=torch.from_numpy(np.ascontiguousarray(domain_BS, dtype=np.int64)),
            doc=torch.from_numpy(np.ascontiguousarray(doc_BS, dtype=np.int64)),
        )

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """Copy of the batch on `device` (the four tensors moved together)."""
        return Batch(
            *(t.to(device, non_blocking=non_blocking) for t in (self.tokens, self.targets, self.domain, self.doc))
        )

    def pin_memory(self) -> Batch:
        """Page-locked copy, so `.to("cuda", non_blocking=True)` overlaps the copy with compute."""
        return Batch(*(t.pin_memory() for t in (self.tokens, self.targets, self.domain, self.doc)))
