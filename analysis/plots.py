"""Figures of the specialization report (matplotlib, no pyplot state: safe headless and in notebooks).

Every function returns a `matplotlib.figure.Figure` and takes either the summary dict that
`analysis.report.analyze_model` returns (and writes as summary.json) or the bare arrays, so notebooks
can plot a run directory's `summary.json` without re-running anything:

    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    plot_domain_expert_heatmaps(summary)
    plot_nmi(summary); plot_knockout(summary); plot_cka(summary); plot_loss_comparison(summary)

`save_figures(summary, out_dir)` writes all of them as PNGs.
Legend: L MoE layers, D domains, E experts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

__all__ = [
    "plot_cka",
    "plot_domain_expert_heatmaps",
    "plot_knockout",
    "plot_loss_comparison",
    "plot_nmi",
    "save_figures",
]

Summary = Mapping[str, Any]


def _arr(x: Any) -> np.ndarray:
    """Nested lists (None = nan, as summary.json writes nan) -> float64 array."""
    return np.array(x, dtype=np.float64)


def _grid(n: int, width: float, height: float, max_cols: int = 4) -> tuple[Figure, list]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _layer_label(summary: Summary | None, i: int) -> str:
    if summary is not None:
        layer = summary["layers"][i]
        return f"MoE layer {layer['layer']} (block {layer['block']})"
    return f"MoE layer {i}"


def plot_domain_expert_heatmaps(source: Summary | Sequence[np.ndarray], domains: Sequence[str] | None = None,
                                *, top_k: int | None = None) -> Figure:
    """Domain x expert heatmaps, one per layer, normalized by domain.

    From a summary: each cell is the fraction of domain d's tokens routed to expert e (OLMoE's
    domain specialization; uniform routing gives k/E, the colormap's centre). From arrays [D, E] of
    counts per layer: each row divided by its sum (and multiplied by `top_k` if given, which makes
    it the same fraction; otherwise uniform = 1/E).
    """
    summary = source if isinstance(source, Mapping) else None
    if summary is not None:
        tables = [_arr(layer["domain_specialization"]) for layer in summary["layers"]]
        uniform = float(summary["layers"][0]["uniform_share"])
        domains = domains or summary["domains"]
    else:
        k = 1 if top_k is None else top_k
        tables = []
        for counts in source:
            c = np.asarray(counts, dtype=np.float64)
            tables.append(k * c / np.maximum(c.sum(axis=1, keepdims=True), 1e-300))
        uniform = k / tables[0].shape[1]
    fig, axes = _grid(len(tables), 0.5 * tables[0].shape[1] + 2.5, 0.4 * tables[0].shape[0] + 2.0)
    vmax = max(np.nanmax(t) for t in tables)
    norm = TwoSlopeNorm(vcenter=uniform, vmin=0.0, vmax=max(vmax, uniform * 1.0001))
    for i, (ax, t) in enumerate(zip(axes, tables)):
        im = ax.imshow(t, cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_title(_layer_label(summary, i), fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(t.shape[1]))
        ax.set_yticks(range(t.shape[0]), labels=list(domains) if domains else range(t.shape[0]))
    fig.colorbar(im, ax=axes, label=f"share of domain's tokens (uniform = {uniform:.3g})")
    fig.suptitle(f"Domain x expert routing (white = uniform routing, k/E = {uniform:.3g})")
    return fig


def plot_nmi(summary: Summary) -> Figure:
    """NMI per layer: plug-in value with its document-bootstrap interval, the Miller-Madow value,
    and the document-permutation null (mean and q95)."""
    nmi = [layer["nmi"] for layer in summary["layers"]]
    x = np.arange(len(nmi))
    plugin = np.array([n["plugin"] for n in nmi])
    lo = np.array([n["ci_low"] for n in nmi])
    hi = np.array([n["ci_high"] for n in nmi])
    fig = Figure(figsize=(max(4.0, 0.8 * len(nmi) + 2.5), 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.errorbar(x, plugin, yerr=[plugin - lo, hi - plugin], fmt="o", capsize=4,
                label=f"plug-in NMI, {100 * nmi[0]['confidence']:.0f}% doc. bootstrap CI")
    ax.plot(x, [n["corrected"] for n in nmi], "s", mfc="none", label="Miller-Madow NMI")
    ax.plot(x, [n["null_mean"] for n in nmi], "_", ms=18, color="grey", label="null mean (doc. permutation)")
    ax.plot(x, [n["null_q95"] for n in nmi], "_", ms=18, color="black", label="null q95")
    thr = summary.get("config", {}).get("thresholds", {}).get("nmi_min")
    if thr is not None:
        ax.axhline(thr, ls=":", color="tab:red", label=f"nmi_min = {thr:g}")
    ax.set_xticks(x, labels=[str(layer["layer"]) for layer in summary["layers"]])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("NMI = I(D;E) / H(D)")
    ax.legend(fontsize=7)
    ax.set_title("Domain information in routing")
    return fig


def plot_knockout(summary: Summary) -> Figure:
    """Knockout damage per layer: the MoE's [D, E] (expert e masked) next to the dense twin's [D, E]
    (hidden slice e zeroed), on one colour scale per layer (nats of loss increase)."""
    layers = [layer for layer in summary["layers"] if layer.get("knockout")]
    if not layers:
        raise ValueError("the summary holds no knockout results")
    domains = summary["domains"]
    has_dense = layers[0]["knockout"].get("dense_damage") is not None
    cols = 2 if has_dense else 1
    e = len(layers[0]["knockout"]["damage"][0])
    fig = Figure(figsize=(cols * (0.5 * e + 2.8), len(layers) * (0.4 * len(domains) + 1.6)), layout="constrained")
    for r, layer in enumerate(layers):
        ko = layer["knockout"]
        mats = [("MoE: expert masked", _arr(ko["damage"]))]
        if has_dense:
            mats.append(("dense twin: slice zeroed", _arr(ko["dense_damage"])))
        vmax = max(np.nanmax(np.abs(m)) for _, m in mats) or 1e-12
        for c, (title, m) in enumerate(mats):
            ax = fig.add_subplot(len(layers), cols, r * cols + c + 1)
            im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
            ax.set_title(f"layer {layer['layer']}: {title}", fontsize=9)
            ax.set_yticks(range(len(domains)), labels=domains)
            ax.set_xticks(range(m.shape[1]))
            ax.set_xlabel("expert" if c == 0 else "slice")
        fig.colorbar(im, ax=fig.axes[-cols:], label="loss increase (nats)")
    fig.suptitle("Knockout damage per domain")
    return fig


def plot_cka(summary_or_matrices: Summary | np.ndarray) -> Figure:
    """Linear CKA between experts on shared probe inputs, one [E, E] panel per layer."""
    summary = summary_or_matrices if isinstance(summary_or_matrices, Mapping) else None
    if summary is not None:
        mats = [_arr(layer["cka"]["matrix"]) for layer in summary["layers"] if layer.get("cka")]
        if not mats:
            raise ValueError("the summary holds no CKA results")
    else:
        mats = list(np.asarray(summary_or_matrices, dtype=np.float64))
    fig, axes = _grid(len(mats), 0.4 * mats[0].shape[0] + 2.2, 0.4 * mats[0].shape[0] + 1.8)
    for i, (ax, m) in enumerate(zip(axes, mats)):
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0)
        off = m[~np.eye(m.shape[0], dtype=bool)]
        ax.set_title(f"{_layer_label(summary, i)}\nmean off-diag {np.nanmean(off):.3f}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
    fig.colorbar(im, ax=axes, label="linear CKA")
    fig.suptitle("Expert redundancy (CKA = 1: same function)")
    return fig


def plot_loss_comparison(source: Summary | Mapping[str, Mapping[str, float]]) -> Figure:
    """Per-domain validation loss (nats) of each model, as points side by side per domain (a dot
    plot: the differences between twins are small next to the loss itself, which bars would hide).
    `source` is a summary (its "comparison") or a mapping model name -> {domain: loss}."""
    comparison = source["comparison"] if "comparison" in source else source
    models = [m for m in comparison if comparison[m]]
    if not models:
        raise ValueError("no losses to compare")
    domains = list(dict.fromkeys(d for m in models for d in comparison[m]))
    x = np.arange(len(domains))
    step = 0.6 / max(len(models), 1)
    fig = Figure(figsize=(max(4.0, 0.9 * len(domains) + 2.5), 3.5), layout="constrained")
    ax = fig.add_subplot()
    for i, m in enumerate(models):
        vals = [np.nan if comparison[m].get(d) is None else comparison[m][d] for d in domains]
        ax.plot(x + (i - (len(models) - 1) / 2) * step, vals, "o", label=m)
    ax.set_xticks(x, labels=domains)
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Per-domain loss: MoE vs dense")
    return fig


def save_figures(summary: Summary, out_dir: str | Path, dpi: int = 110) -> dict[str, str]:
    """Write every figure the summary supports as `out_dir/<name>.png`; returns name -> file name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = {"domain_expert": plot_domain_expert_heatmaps, "nmi": plot_nmi}
    if any(layer.get("knockout") for layer in summary["layers"]):
        makers["knockout"] = plot_knockout
    if any(layer.get("cka") for layer in summary["layers"]):
        makers["cka"] = plot_cka
    if summary.get("comparison"):
        makers["loss"] = plot_loss_comparison
    written = {}
    for name, make in makers.items():
        fig = make(summary)
        fig.savefig(out / f"{name}.png", dpi=dpi)
        written[name] = f"{name}.png"
    return written
