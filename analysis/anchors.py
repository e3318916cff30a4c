"""External anchors: OLMoE's published routing counts scored with this package's own measures.

The OLMoE paper (Muennighoff et al. 2024, arXiv:2409.02060) shows domain specialization as bar
charts of domain x expert routing counts for OLMoE-1B-7B and Mixtral-8x7B at layers 0, 7 and 15.
Its repository published the counts; `analysis/data/olmoe_routing_counts.json` holds them (five
domains, top-1 and top-k counting, provenance in its `source` block). Scoring them with
`analysis.information` gives reference numbers measured exactly like ours, not read off a figure.

Legend as in `moe/__init__.py`: G domains, E experts, K slots per token (top_k for top-k
counting, 1 for top-1). Information in bits; in I(D;E) and H(D), D is the domain variable.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np

from analysis.information import (
    entropy,
    mutual_information,
    mutual_information_mm,
    normalized_mutual_information,
    normalized_mutual_information_mm,
)

__all__ = [
    "COUNTINGS",
    "AnchorRow",
    "Counting",
    "ModelRoutingCounts",
    "anchor_rows",
    "anchor_source",
    "load_anchor_counts",
]

Counting = Literal["top1", "topk"]
COUNTINGS: tuple[Counting, ...] = ("top1", "topk")
_DATA_FILE = "data/olmoe_routing_counts.json"


@dataclass(frozen=True)
class ModelRoutingCounts:
    """One model's published counts.

    tables[(counting, layer)] is a read-only [G, E] int64 table: for "topk", how often expert e was
    among the top_k experts of a token of domain d (rows sum to top_k * tokens_per_domain); for
    "top1", how often it was the highest-logit expert (rows sum to tokens_per_domain).
    """

    model: str
    hf_id: str
    n_experts: int
    top_k: int
    domains: tuple[str, ...]
    layers: tuple[int, ...]
    tokens_per_domain: int
    tables: Mapping[tuple[Counting, int], np.ndarray]

    def slots(self, counting: Counting) -> int:
        """K: assignments counted per token (top_k for "topk", 1 for "top1")."""
        return self.top_k if counting == "topk" else 1


@functools.cache
def _document() -> dict[str, Any]:
    # Beside this module in every install (package data); resolving the `analysis` package by name
    # can land on a tests/analysis/ namespace directory when tests put tests/ first on sys.path.
    text = (Path(__file__).parent / _DATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def anchor_source() -> dict[str, Any]:
    """Provenance of the shipped counts: repository, commit, original paths, paper, meaning."""
    doc = _document()
    return copy.deepcopy({**doc["source"], "meaning": doc["meaning"]})  # callers cannot alter the cache


@functools.cache
def load_anchor_counts() -> dict[str, ModelRoutingCounts]:
    """The shipped counts by model name ("OLMoE-1B-7B", "Mixtral-8x7B"), tables [G, E] int64.

    Cached; the arrays are read-only so that no caller can alter what the next one reads.
    """
    doc = _document()
    domains = tuple(doc["domains"])
    layers = tuple(int(layer) for layer in doc["layers"])
    out: dict[str, ModelRoutingCounts] = {}
    for name, m in doc["models"].items():
        tables: dict[tuple[Counting, int], np.ndarray] = {}
        for counting in COUNTINGS:
            for layer in layers:
                table = np.asarray(m["counts"][counting][str(layer)], dtype=np.int64)
                if table.shape != (len(domains), m["n_experts"]):
                    raise ValueError(
                        f"{name} {counting} layer {layer}: table has shape {table.shape}, "
                        f"expected [G={len(domains)}, E={m['n_experts']}]"
                    )
                table.flags.writeable = False
                tables[(counting, layer)] = table
        out[name] = ModelRoutingCounts(
            name, m["hf_id"], int(m["n_experts"]), int(m["top_k"]), domains, layers, int(m["tokens_per_domain"]), tables
        )
    return out


class AnchorRow(TypedDict):
    """One (model, layer, counting) of the anchors table. Information in bits."""

    model: str
    layer: int
    counting: Counting
    K: int  # slots per token counted
    E: int  # experts
    G: int  # domains
    assignments: int  # table total = tokens * K
    entropy_domain_bits: float  # H(D)
    mi_bits: float  # plug-in I(D;E)
    mi_mm_bits: float  # Miller-Madow I(D;E)
    nmi: float  # plug-in I(D;E) / H(D)
    nmi_mm: float  # Miller-Madow I(D;E) / H(D)


def anchor_rows(counts: Mapping[str, ModelRoutingCounts] | None = None) -> list[AnchorRow]:
    """One row per (model, layer, counting) of `counts` (default: the shipped counts).

    The Miller-Madow values take N = the table total (tokens * K), as `analysis.measures` does for
    our own runs, so the two are comparable; with ~10^5-10^6 assignments the correction is < 1e-3.
    """
    rows: list[AnchorRow] = []
    for m in (load_anchor_counts() if counts is None else counts).values():
        for layer in m.layers:
            for counting in COUNTINGS:
                joint = m.tables[(counting, layer)]
                rows.append(
                    AnchorRow(
                        model=m.model,
                        layer=layer,
                        counting=counting,
                        K=m.slots(counting),
                        E=m.n_experts,
                        G=len(m.domains),
                        assignments=int(joint.sum()),
                        entropy_domain_bits=entropy(joint.sum(axis=1)),
                        mi_bits=mutual_information(joint),
                        mi_mm_bits=mutual_information_mm(joint),
                        nmi=normalized_mutual_information(joint),
                        nmi_mm=normalized_mutual_information_mm(joint),
                    )
                )
    return rows
