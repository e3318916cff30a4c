"""The raw routing records of a recording and their `.npz` file format (numpy only, no torch).

Legend as in `moe/__init__.py`: N recorded tokens (rows of the records, in stream order), K slots
per token (top-k; E for expert choice), E experts, G domains, L MoE layers.

`analysis.recorder` fills these while it records; `analysis.runs` and the notebooks read them back
(`RoutingRecords.load`) without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RECORDS_FORMAT_VERSION", "LayerRecords", "RoutingRecords"]

RECORDS_FORMAT_VERSION = 1


@dataclass
class LayerRecords:
    """Raw routing of one layer: experts [N, K] int, gates [N, K] float32, kept [N, K] bool."""

    experts: np.ndarray
    gates: np.ndarray
    kept: np.ndarray


@dataclass
class RoutingRecords:
    """Raw per-token records over N tokens in stream order (batch, then row, then position).

    token, domain, doc, position: [N] int64 (position = index in its sequence, 0..S-1);
    layers: one `LayerRecords` per MoE layer (L of them); domains: the G domain names (domain ids
    index it).
    """

    domains: list[str]
    token: np.ndarray
    domain: np.ndarray
    doc: np.ndarray
    position: np.ndarray
    layers: list[LayerRecords]
    num_experts: int
    top_k: int

    def save(self, path: str | Path) -> Path:
        """Write a compressed `.npz` (keys: format_version, domains, num_experts, top_k, num_layers,
        token, domain, doc, position, layer{l}_experts, layer{l}_gates, layer{l}_kept)."""
        arrays = {
            "format_version": np.int64(RECORDS_FORMAT_VERSION),
            "domains": np.array(self.domains, dtype=str),
            "num_experts": np.int64(self.num_experts),
            "top_k": np.int64(self.top_k),
            "num_layers": np.int64(len(self.layers)),
            "token": self.token,
            "domain": self.domain,
            "doc": self.doc,
            "position": self.position,
        }
        for i, layer in enumerate(self.layers):
            arrays[f"layer{i}_experts"] = layer.experts
            arrays[f"layer{i}_gates"] = layer.gates
            arrays[f"layer{i}_kept"] = layer.kept
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingRecords:
        """Read a file written by `save`; ValueError for another format version."""
        with np.load(path) as z:
            version = int(z["format_version"])
            if version != RECORDS_FORMAT_VERSION:
                raise ValueError(
                    f"{path} holds routing records of format {version}; this reader reads {RECORDS_FORMAT_VERSION}"
                )
            n_layers = int(z["num_layers"])
            layers = [
                LayerRecords(z[f"layer{i}_experts"], z[f"layer{i}_gates"], z[f"layer{i}_kept"]) for i in range(n_layers)
            ]
            return cls(
                [str(d) for d in z["domains"]],
                z["token"],
                z["domain"],
                z["doc"],
                z["position"],
                layers,
                int(z["num_experts"]),
                int(z["top_k"]),
            )
