"""Figures of the specialization report (matplotlib, no pyplot state: safe headless and in notebooks).

Every function returns a `matplotlib.figure.Figure` and takes either the summary dict that
`analysis.report.analyze_model` returns (and writes as summary.json) or the bare arrays, so notebooks
can plot a run directory's `summary.json` without re-running anything:

    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    plot_domain_expert_heatmaps(summary)
    plot_nmi(summary); plot_information(summary); plot_knockout(summary); plot_cka(summary)
    plot_loss_comparison(summary)

Run directories and sweeps are read by `analysis.runs`; its loaders feed `plot_loss_curves`
(`run.val_curves()`) and `plot_sweep` (`sweep_rows(sweep)`). `save_figures(summary, out_dir)` writes
the report's figures as PNGs; `save_figure(fig, name, out_dir)` one figure.
Legend as in `moe/__init__.py`: L MoE layers, G domains, E experts (D in I(D;E), H(D) is the domain
variable, and "1/D" on a colour bar is one over the number of domains).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from analysis.measures import MEASURES  # the registry, with every measure registered
from moe.validation import check_choice

__all__ = [
    "SWEEP_METRICS",
    "plot_arm_intervals",
    "plot_cka",
    "plot_domain_expert_heatmaps",
    "plot_information",
    "plot_knockout",
    "plot_loss_comparison",
    "plot_loss_curves",
    "plot_nmi",
    "plot_sweep",
    "plot_sweep_heatmaps",
    "save_figure",
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


def _point_and_interval(ax, x, y, lo, hi, color: str, label: str | None = None, capsize: int = 4) -> None:
    """Points y at x with intervals [lo, hi] drawn as they are: a percentile bootstrap interval of
    a biased statistic (plug-in MI near zero) may lie wholly above its point estimate."""
    lo, hi = _arr(lo), _arr(hi)
    ax.errorbar(x, (lo + hi) / 2, yerr=(hi - lo) / 2, fmt="none", capsize=capsize, color=color)
    ax.plot(x, y, "o", color=color, label=label)


def _layer_label(summary: Summary | None, i: int) -> str:
    if summary is not None:
        layer = summary["layers"][i]
        return f"MoE layer {layer['layer']} (block {layer['block']})"
    return f"MoE layer {i}"


def _labels(domains: Sequence[str] | None, n: int) -> list[str]:
    return list(domains) if domains else [str(d) for d in range(n)]


def _annotate(ax, table: np.ndarray, norm) -> None:
    """Write each cell's value on it, white on saturated colours."""
    for (r, c), v in np.ndenumerate(table):
        if np.isfinite(v):
            dark = abs(float(norm(v)) - 0.5) > 0.3
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")


def plot_domain_expert_heatmaps(
    source: Summary | Sequence[np.ndarray],
    domains: Sequence[str] | None = None,
    *,
    top_k: int | None = None,
    normalize: str = "domain",
    titles: Sequence[str] | None = None,
    annotate: bool | None = None,
) -> Figure:
    """Domain x expert heatmaps, one per layer (or per table given), on one diverging colour scale
    whose white centre is what routing that ignores the domain would give.

    normalize="domain" (default): each cell is the fraction of domain d's tokens routed to expert e
    (OLMoE's domain specialization; rows sum to k). Uniform routing gives k/E, the colour centre,
    marked on the colour bar. From a summary this is its `domain_specialization`; from arrays [G, E]
    of counts per layer, each row is divided by its sum and multiplied by `top_k` if given (which
    makes it the same fraction; otherwise uniform = 1/E, e.g. for gate-weighted tables).

    normalize="expert": each cell is P(d | e), the share of expert e's assignments that come from
    domain d (columns sum to 1): what each expert is made of. Routing that ignores the domain gives
    P(d | e) = p(d), the domain's share of all assignments, printed after its name; the colour centre
    is 1/G, their mean (exact for balanced domains).

    `titles` replaces the per-layer panel titles (e.g. run labels when comparing runs); `annotate`
    writes the values in the cells (default: when a panel has at most 80 cells).
    """
    check_choice("normalize", normalize, ("domain", "expert"))
    summary = source if isinstance(source, Mapping) else None
    if summary is not None:
        counts = [_arr(layer["domain_expert_counts"]) for layer in summary["layers"]]
        domains = domains or summary["domains"]
    else:
        counts = [np.asarray(c, dtype=np.float64) for c in source]
    if not counts:
        raise ValueError("no domain x expert tables to plot")
    n_dom, n_exp = counts[0].shape
    labels = [_labels(domains, n_dom)] * len(counts)
    if normalize == "domain":
        if summary is not None:
            tables = [_arr(layer["domain_specialization"]) for layer in summary["layers"]]
            uniform = float(summary["layers"][0]["uniform_share"])
        else:
            k = 1 if top_k is None else top_k
            tables = [k * c / np.maximum(c.sum(axis=1, keepdims=True), 1e-300) for c in counts]
            uniform = k / n_exp
        # Without top_k the rows of arrays sum to 1 (e.g. gate-weighted tables): shares of routing weight.
        per_token = summary is not None or bool(top_k)
        what = "share of the domain's tokens" if per_token else "share of the domain's routing weight"
        ref = "k/E" if per_token else "1/E"
        bar_label = f"{what}\n(line: uniform {ref} = {uniform:.3g})"
        heading = f"Domain x expert routing, normalized by domain (white = uniform {ref} = {uniform:.3g})"
    else:
        tables = [c / np.maximum(c.sum(axis=0, keepdims=True), 1e-300) for c in counts]
        uniform = 1.0 / n_dom
        labels = []
        for c in counts:
            p = c.sum(axis=1) / max(c.sum(), 1e-300)
            labels.append([f"{name} ({pd:.2f})" for name, pd in zip(_labels(domains, n_dom), p)])
        bar_label = f"P(domain | expert)\n(line: 1/D = {uniform:.3g})"
        heading = (
            "Domain x expert routing, normalized by expert (columns sum to 1; domain-blind routing "
            "gives p(d), in brackets)"
        )
    if titles is not None and len(titles) != len(tables):
        raise ValueError(f"{len(titles)} titles for {len(tables)} tables")
    if annotate is None:
        annotate = n_dom * n_exp <= 80
    fig, axes = _grid(len(tables), 0.5 * n_exp + 2.5, 0.4 * n_dom + 2.0)
    vmax = max(np.nanmax(t) if np.isfinite(t).any() else uniform for t in tables)
    norm = TwoSlopeNorm(vcenter=uniform, vmin=0.0, vmax=max(vmax, uniform * 1.0001))
    for i, (ax, t) in enumerate(zip(axes, tables)):
        im = ax.imshow(t, cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_title(titles[i] if titles is not None else _layer_label(summary, i), fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(n_exp))
        ax.set_yticks(range(n_dom), labels=labels[i])
        if annotate:
            _annotate(ax, t, norm)
    bar = fig.colorbar(im, ax=axes, label=bar_label)
    bar.ax.axhline(uniform, color="black", lw=1.5)
    fig.suptitle(heading, fontsize=10)
    return fig


def plot_sweep_heatmaps(summaries: Mapping[str, Summary], layer: int = -1, normalize: str = "domain") -> Figure:
    """Domain x expert heatmaps of one MoE layer (index into each summary's layers; -1 = the last),
    one panel per run, titled by its key in `summaries` (e.g. `analysis.runs.Sweep.summaries()`).
    The runs must share their domains and k/E; the colour scale is common to all panels."""
    if not summaries:
        raise ValueError("no analyzed runs to plot")
    first = next(iter(summaries.values()))
    for name, s in summaries.items():
        if s["domains"] != first["domains"]:
            raise ValueError(f"run {name!r} has domains {s['domains']}, not {first['domains']}")
        if s["layers"][0]["uniform_share"] != first["layers"][0]["uniform_share"]:
            raise ValueError(
                f"run {name!r} has k/E = {s['layers'][0]['uniform_share']}, not {first['layers'][0]['uniform_share']}"
            )
    picked = []
    for name, s in summaries.items():
        if not -len(s["layers"]) <= layer < len(s["layers"]):
            raise ValueError(f"run {name!r} has {len(s['layers'])} MoE layers; layer {layer} is out of range")
        picked.append(s["layers"][layer])
    titles = [f"{name}\nMoE layer {entry['layer']}" for name, entry in zip(summaries, picked)]
    return plot_domain_expert_heatmaps(
        {"domains": first["domains"], "layers": picked}, normalize=normalize, titles=titles
    )


def plot_nmi(summary: Summary) -> Figure:
    """NMI per layer above chance: NMI minus its document-permutation null mean, with the
    bias-corrected document-bootstrap interval, against the equivalence margin (below it with the
    whole interval: ensemble); the plug-in NMI and the null q95 for reference."""
    nmi = [layer["measures"]["nmi"] for layer in summary["layers"]]
    x = np.arange(len(nmi))
    fig = Figure(figsize=(max(4.0, 0.8 * len(nmi) + 2.5), 3.5), layout="constrained")
    ax = fig.add_subplot()
    _point_and_interval(
        ax,
        x,
        _arr([n["value"] for n in nmi]),
        _arr([n["ci_low"] for n in nmi]),
        _arr([n["ci_high"] for n in nmi]),
        color="C0",
        label=f"NMI − null mean, {100 * nmi[0]['confidence']:.0f}% doc. bootstrap CI",
    )
    ax.plot(x, [n["plugin"] for n in nmi], "s", mfc="none", color="grey", label="plug-in NMI")
    ax.plot(x, [n["null_q95"] for n in nmi], "_", ms=18, color="black", label="plug-in null q95")
    thr = summary.get("config", {}).get("thresholds", {}).get("nmi_margin")
    if thr is not None:
        ax.axhline(thr, ls=":", color="tab:red", label=f"nmi_margin = {thr:g}")
    ax.axhline(0.0, lw=0.6, color="black")
    ax.set_xticks(x, labels=[str(layer["layer"]) for layer in summary["layers"]])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("NMI = I(D;E) / H(D)")
    ax.legend(fontsize=7)
    ax.set_title("Domain information in routing, above chance")
    return fig


def plot_measures(summary: Summary) -> Figure:
    """Every registered measure (`analysis.registry.MEASURES`) per layer: value with its interval
    where it has one, and its null mean (grey tick) where it has one; one panel per measure that
    was measured."""
    layers = summary["layers"]
    names = [n for n in MEASURES if any(layer["measures"].get(n, {}).get("value") is not None for layer in layers)]
    if not names:
        raise ValueError("the summary holds no measured values")
    fig, axes = _grid(len(names), max(2.6, 0.5 * len(layers) + 1.8), 2.6, max_cols=4)
    x = np.arange(len(layers))
    for ax, name in zip(axes, names):
        entries = [layer["measures"].get(name) or {} for layer in layers]
        y = _arr([e.get("value") for e in entries])
        lo, hi = _arr([e.get("ci_low") for e in entries]), _arr([e.get("ci_high") for e in entries])
        if np.isfinite(lo).any():
            _point_and_interval(ax, x, y, lo, hi, color="C0")
        else:
            ax.plot(x, y, "o", color="C0")
        ax.plot(x, _arr([e.get("null_mean") for e in entries]), "_", ms=14, color="grey")
        ax.set_xticks(x, labels=[str(layer["layer"]) for layer in layers])
        ax.set_xlabel("MoE layer")
        ax.set_title(f"{MEASURES[name].label} ({MEASURES[name].unit})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Every measure per layer (grey: its null mean)")
    return fig


def plot_information(summary: Summary) -> Figure:
    """Vocabulary vs domain, per layer (bits).

    Left: I(D;E) (plug-in bar, Miller-Madow marker) beside I(T;E), with H(D), the most I(D;E) can
    be, as a dashed tick. Right: the held-out I(D;E|C) (`analysis.heldout`), the domain information
    in routing beyond the context C, as a share of H(D|C) with its document-bootstrap interval, in
    bits beside it. A router that reads only the token id scores ~0 however large I(D;E) is.
    """
    layers = summary["layers"]
    x = np.arange(len(layers))
    names = [str(layer["layer"]) for layer in layers]
    fig = Figure(figsize=(max(8.0, 1.6 * len(layers) + 5.0), 3.8), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)

    mi_d = _arr([layer["measures"]["mi_domain"]["value"] for layer in layers])
    mi_d_mm = _arr([layer["measures"]["mi_domain"]["corrected"] for layer in layers])
    mi_t = _arr([layer["measures"]["mi_token"]["value"] for layer in layers])
    mi_t_mm = _arr([layer["measures"]["mi_token"]["corrected"] for layer in layers])
    h_d = _arr([layer["measures"]["mi_domain"]["entropy_domain_bits"] for layer in layers])
    w = 0.36
    left.bar(x - w / 2, mi_d, w, label="I(D;E) domain")
    left.bar(x + w / 2, mi_t, w, label="I(T;E) token id")
    left.plot(np.concatenate([x - w / 2, x + w / 2]), np.concatenate([mi_d_mm, mi_t_mm]), "k.", label="Miller-Madow")
    left.plot(x - w / 2, h_d, "_", ms=20, mew=2, color="tab:red", label="H(D) (ceiling of I(D;E))")
    left.set_xticks(x, labels=names)
    left.set_xlabel("MoE layer")
    left.set_ylabel("bits")
    left.legend(fontsize=7)
    left.set_title("What the expert choice tells about the token", fontsize=9)

    cmi = [layer["measures"]["cmi"] for layer in layers]
    share = _arr([c["value"] for c in cmi])
    _point_and_interval(
        right,
        x,
        share,
        _arr([c["ci_low"] for c in cmi]),
        _arr([c["ci_high"] for c in cmi]),
        color="tab:green",
        label="held-out I(D;E|C) / H(D|C), doc. bootstrap CI",
    )
    thr = summary.get("config", {}).get("thresholds", {}).get("cmi_margin")
    if thr is not None:
        right.axhline(thr, ls=":", color="tab:red", label=f"cmi_margin = {thr:g}")
    right.axhline(0.0, lw=0.6, color="black")
    for xi, c, y in zip(x, cmi, share):
        if np.isfinite(y) and c.get("bits") is not None and c.get("h_domain_given_context_bits") is not None:
            right.annotate(
                f"{c['bits']:.3g} bits\nH(D|C) = {c['h_domain_given_context_bits']:.3g}",
                (xi, y),
                textcoords="offset points",
                xytext=(8, 0),
                fontsize=7,
            )
    right.margins(y=0.25)
    right.set_xticks(x, labels=names)
    right.set_xlabel("MoE layer")
    right.set_ylabel("share of H(D|C)")
    right.legend(fontsize=7)
    right.set_title(f"Domain information beyond the context ({cmi[0].get('context', 'token')})", fontsize=9)
    fig.suptitle("Vocabulary vs domain specialization")
    return fig


def plot_knockout(summary: Summary) -> Figure:
    """Knockout damage per layer. Left: the MoE's [G, E] damage (expert e's assignments dropped),
    nats of loss increase. Right (with a dense twin): each unit's noise-corrected damage CV across
    domains against its mean damage, experts (filled) and the twin's random unit groups of the same
    layer (open), on a log damage axis: a specialist expert sits above dense groups of equal damage."""
    layers = [layer for layer in summary["layers"] if layer["measures"]["knockout"].get("damage") is not None]
    if not layers:
        raise ValueError("the summary holds no knockout results")
    domains = summary["domains"]
    has_dense = layers[0]["measures"]["knockout"].get("dense_damage") is not None
    cols = 2 if has_dense else 1
    e = len(layers[0]["measures"]["knockout"]["damage"][0])
    fig = Figure(figsize=(cols * (0.5 * e + 3.2), len(layers) * (0.4 * len(domains) + 1.8)), layout="constrained")
    for r, layer in enumerate(layers):
        ko = layer["measures"]["knockout"]
        m = _arr(ko["damage"])
        vmax = np.nanmax(np.abs(m)) or 1e-12
        ax = fig.add_subplot(len(layers), cols, r * cols + 1)
        im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_title(f"layer {layer['layer']}: expert dropped", fontsize=9)
        ax.set_yticks(range(len(domains)), labels=domains)
        ax.set_xticks(range(m.shape[1]))
        ax.set_xlabel("expert")
        fig.colorbar(im, ax=ax, label="loss increase (nats)")
        if has_dense:
            ax = fig.add_subplot(len(layers), cols, r * cols + 2)
            ax.plot(
                _arr(ko["dense_mean_damage"]),
                _arr(ko["dense_cv"]),
                "o",
                mfc="none",
                color="grey",
                label="dense twin: random unit group",
            )
            ax.plot(_arr(ko["mean_damage"]), _arr(ko["cv"]), "o", color="C3", label="MoE: expert")
            ax.set_xscale("symlog", linthresh=1e-3)
            ax.set_xlabel("mean damage (nats)")
            ax.set_ylabel("damage CV across domains")
            ax.set_title(f"layer {layer['layer']}: selectivity at matched damage", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle("Knockout damage per domain")
    return fig


def plot_cka(summary_or_matrices: Summary | np.ndarray) -> Figure:
    """Linear CKA between experts on shared probe inputs, one [E, E] panel per layer."""
    summary = summary_or_matrices if isinstance(summary_or_matrices, Mapping) else None
    if summary is not None:
        mats = [
            _arr(layer["measures"]["cka"]["matrix"])
            for layer in summary["layers"]
            if layer["measures"]["cka"].get("matrix") is not None
        ]
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
    comparison: Mapping[str, Any] = source["comparison"] if "comparison" in source else source
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


def plot_loss_curves(
    curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    domains: Sequence[str] | None = None,
    reference: str = "moe",
) -> Figure:
    """Validation loss (nats/token) over training steps, one panel per domain, one line per model.

    `curves` maps model name -> {domain: (steps, losses)} (`analysis.runs.Run.val_curves()`). With
    `reference` among the models, a last panel shows every other model minus the reference per
    domain (matching steps only), where a gap too small to see on the loss scale shows: above 0 the
    reference (the MoE) is better on that domain.
    """
    models = sorted((m for m in curves if curves[m]), key=lambda m: m != reference)  # reference first
    if not models:
        raise ValueError("no validation loss curves (were there evaluations? trainer.eval_every)")
    domains = list(domains or dict.fromkeys(d for m in models for d in curves[m]))
    others = [m for m in models if m != reference] if reference in models else []
    n = len(domains) + (1 if others else 0)
    fig, axes = _grid(n, 3.2, 2.6)
    for ax, d in zip(axes, domains):
        for m in models:
            if d in curves[m]:
                steps, loss = curves[m][d]
                ax.plot(steps, loss, "o-", ms=3, label=m)
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("val loss (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if others:
        ax = axes[len(domains)]
        ref = curves[reference]
        colors = [f"C{i}" for i in range(10)]
        styles = ["-", "--", ":", "-."]
        for j, m in enumerate(others):
            for i, d in enumerate(domains):
                if d not in ref or d not in curves[m]:
                    continue
                rs, rl = (np.asarray(a) for a in ref[d])
                ms, ml = (np.asarray(a) for a in curves[m][d])
                common, ri, mi = np.intersect1d(rs, ms, return_indices=True)
                ax.plot(common, ml[mi] - rl[ri], styles[j % 4], color=colors[i % 10], label=f"{m}: {d}")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(f"other model − {reference} (> 0: {reference} better)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("nats")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Per-domain validation loss during training")
    return fig


# Per-layer sweep metrics: every registered measure (rows carry name, name_low, name_high), plus
# the per-run loss gap.
SWEEP_METRICS = {
    **{name: m.description for name, m in MEASURES.items()},
    "loss_gap": "MoE − dense loss (nats, all domains)",
}


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    by: str | None = None,
    metrics: Sequence[str] = ("nmi", "cmi", "knockout", "cka", "loss_gap"),
) -> Figure:
    """Specialization measures across the runs of a sweep, one panel per metric.

    `rows` are `analysis.runs.sweep_rows(sweep)` (one per run and MoE layer). The x axis has one
    position per value of the row key `by` (e.g. "balance.scope"; default: one per run label);
    runs sharing a value (e.g. seeds) sit side by side, colour = MoE layer, and a short bar marks the
    mean per layer. Per-run metrics (loss_gap) are drawn once per run, in black.
    """
    unknown = [m for m in metrics if m not in SWEEP_METRICS]
    if unknown:
        raise ValueError(f"unknown sweep metrics {unknown}; known: {list(SWEEP_METRICS)}")
    if not rows:
        raise ValueError("no rows to plot")
    key = by or "label"
    groups = list(dict.fromkeys(str(r.get(key)) for r in rows))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    layers = sorted({r["layer"] for r in rows if r.get("layer") is not None})
    per_group = {g: list(dict.fromkeys(r["run"] for r in rows if str(r.get(key)) == g)) for g in groups}
    width = 0.7
    fig, axes = _grid(len(metrics), max(3.0, 0.9 * len(groups) + 1.6), 3.0, max_cols=3)

    def xpos(r: Mapping[str, Any], layer_slot: int, n_slots: int) -> float:
        g = str(r.get(key))
        members = per_group[g]
        slot = members.index(r["run"]) * n_slots + layer_slot
        total = len(members) * n_slots
        return groups.index(g) + (slot + 0.5) / total * width - width / 2

    for ax, metric in zip(axes, metrics):
        if metric == "loss_gap":
            seen: dict[Any, Mapping[str, Any]] = {}
            for r in rows:
                seen.setdefault(r["run"], r)
            for r in seen.values():
                ax.plot(xpos(r, 0, 1), r.get(metric, np.nan), "o", color="black")
            ax.axhline(0.0, color="grey", lw=0.8)
        else:
            for li, layer in enumerate(layers):
                sel = [r for r in rows if r.get("layer") == layer]
                xs = [xpos(r, li, len(layers)) for r in sel]
                ys = _arr([r.get(metric, np.nan) for r in sel])
                color = f"C{li % 10}"
                lo = _arr([r.get(f"{metric}_low", np.nan) for r in sel])
                hi = _arr([r.get(f"{metric}_high", np.nan) for r in sel])
                if np.isfinite(lo).any():
                    _point_and_interval(ax, xs, ys, lo, hi, color=color, label=f"layer {layer}", capsize=3)
                else:
                    ax.plot(xs, ys, "o", color=color, label=f"layer {layer}")
                for gi, g in enumerate(groups):
                    vals = [y for r, y in zip(sel, ys) if str(r.get(key)) == g and np.isfinite(y)]
                    if vals:
                        ax.plot([gi - width / 2, gi + width / 2], [np.mean(vals)] * 2, color=color, lw=1, alpha=0.5)
            if metric in ("nmi", "cmi"):
                ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(groups)), labels=[g.replace(", ", "\n") for g in groups], fontsize=7)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_title(SWEEP_METRICS[metric], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
    if handles:
        handles[0].legend(fontsize=7)
    fig.suptitle(f"{len(runs)} runs by {key}" + ("" if by is None else " (side by side: the other axes)"))
    return fig


def plot_arm_intervals(
    aggregate: Sequence[Mapping[str, Any]], measures: Sequence[str], descriptions: Mapping[str, str] | None = None
) -> Figure:
    """Measures of a sweep averaged over seeds, with their intervals: one row of panels per measure,
    one column per corpus, arms on the x axis, colour = MoE layer.

    `aggregate` are `analysis.sweep.aggregate_measures` rows: {"corpus", "arm", "layer", <measure>:
    {"mean", "low", "high", "n"}}. A nan interval (one seed) draws the mean alone. Plug-in NMI panels add the
    null's q95 (grey ticks); knockout panels the dense twin's slices (open circles).
    """
    if not aggregate:
        raise ValueError("no aggregate rows to plot")
    corpora = list(dict.fromkeys(a["corpus"] for a in aggregate))
    layers = sorted({a["layer"] for a in aggregate})
    n_arms = max(len({a["arm"] for a in aggregate if a["corpus"] == c}) for c in corpora)
    fig = Figure(figsize=(max(3.5, 0.75 * n_arms + 1.5) * len(corpora), 2.6 * len(measures)), layout="constrained")
    axes = fig.subplots(len(measures), len(corpora), squeeze=False)
    width = 0.6

    def point(iv: Mapping[str, float]) -> tuple[float, float, float]:
        mean = _nan_float(iv.get("mean"))
        low, high = _nan_float(iv.get("low")), _nan_float(iv.get("high"))
        return mean, (mean - low) if np.isfinite(low) else 0.0, (high - mean) if np.isfinite(high) else 0.0

    for col, corpus in enumerate(corpora):
        rows = [a for a in aggregate if a["corpus"] == corpus]
        arms = list(dict.fromkeys(a["arm"] for a in rows))
        for row, measure in enumerate(measures):
            ax = axes[row][col]
            for li, layer in enumerate(layers):
                sel = [a for a in rows if a["layer"] == layer]
                xs = [arms.index(a["arm"]) + (li + 0.5) / len(layers) * width - width / 2 for a in sel]
                pts = np.array([point(a[measure]) for a in sel]).reshape(-1, 3)
                color = f"C{li % 10}"
                ax.errorbar(
                    xs, pts[:, 0], yerr=[pts[:, 1], pts[:, 2]], fmt="o", color=color, capsize=3, label=f"layer {layer}"
                )
                if measure == "nmi_plugin" and sel and "nmi_null_q95" in sel[0]:
                    ax.plot(xs, [point(a["nmi_null_q95"])[0] for a in sel], "_", ms=10, color="grey")
            if measure in ("nmi", "cmi", "loss_gap"):
                ax.axhline(0.0, color="grey", lw=0.8)
            ax.set_xticks(range(len(arms)), labels=arms, fontsize=7, rotation=30)
            ax.set_xlim(-0.6, len(arms) - 0.4)
            ax.grid(axis="y", alpha=0.3)
            title = (descriptions or {}).get(measure, SWEEP_METRICS.get(measure, measure))
            ax.set_title(f"{corpus}: {title}" if row == 0 else title, fontsize=8)
    axes[0][0].legend(fontsize=7)
    return fig


def _nan_float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def save_figure(fig: Figure, name: str, out_dir: str | Path | None = None, dpi: int = 110) -> Figure:
    """Write `fig` as `out_dir/<name>.png` when `out_dir` is set; returns `fig` (so a notebook cell
    can end with it and still show it)."""
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / f"{name}.png", dpi=dpi)
    return fig


def save_figures(summary: Summary, out_dir: str | Path, dpi: int = 110) -> dict[str, str]:
    """Write every figure the summary supports as `out_dir/<name>.png`; returns name -> file name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers: dict[str, Callable[[Summary], Figure]] = {
        "domain_expert": plot_domain_expert_heatmaps,
        "nmi": plot_nmi,
        "measures": plot_measures,
    }
    if any(layer["measures"]["knockout"].get("damage") is not None for layer in summary["layers"]):
        makers["knockout"] = plot_knockout
    if any(layer["measures"]["cka"].get("matrix") is not None for layer in summary["layers"]):
        makers["cka"] = plot_cka
    if summary.get("comparison"):
        makers["loss"] = plot_loss_comparison
    written = {}
    for name, make in makers.items():
        fig = make(summary)
        fig.savefig(out / f"{name}.png", dpi=dpi)
        written[name] = f"{name}.png"
    return written
