"""`moe-sweep`: analyze the MoE jobs of a specialization sweep against their dense twins, then
aggregate the sweep into one table and a few figures.

    moe-train -m experiment=specialization
    moe-sweep sweep_dir=multirun/2026-11-28/10-00-00             # -> <sweep_dir>/summary/
    moe-sweep sweep_dir=... analysis.n_permutations=1000 reanalyze=true

The sweep's jobs (conf/arm/) come in two kinds: MoE jobs (one balance scope or control router each)
and `dense` jobs that train the MoE's twins alone (`twin.only=true`). Each MoE job is paired with
the dense job that trained on the same data stream with the same model config and optimization
(`analysis.run.training_identity`), analyzed with that job's active-matched twin as the knockout
control (skipped when its `analysis/summary.json` exists, unless `reanalyze`), and compared with both
twins' validation losses.

Output (`<sweep_dir>/summary/`):
- `runs.csv`: one row per (MoE job, MoE layer): corpus, arm, seed, layer, the measures below, and
  the job's and its twins' per-domain validation losses (nats/token).
- `aggregate.json` and `results.md`: per (corpus, arm, layer) the mean of each measure over seeds
  with a Student-t interval (`confidence`), each arm's difference to `micro_batch` paired by seed,
  and per (corpus, arm) the MoE's loss gap to each twin, paired by seed.
- `figures/`: `measures_by_arm.png` (means and seed intervals), `seeds_<corpus>.png` (every seed).
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from scipy import stats

from analysis.anchors import anchor_rows, anchor_source
from analysis.measures import MEASURES as REGISTRY
from analysis.paths import PATH_MEASURES
from analysis.plots import plot_arm_intervals, plot_sweep, save_figure
from analysis.progress import progress
from analysis.report import AnalysisConfig
from analysis.run import analyze_run, training_identity
from analysis.runs import ACTIVE_TWIN, Run, Sweep, load_run, load_sweep, loss_gap, sweep_rows
from analysis.trajectory import plot_trajectory, specialization_over_training, write_trajectory
from moe.balance import ADAPTIVE_SCOPES
from moe.checkpoint import checkpoint_dir, list_checkpoints
from moe.config import config_object
from moe.routers import RouterConfig, router_kinds, router_spec
from moe.tables import markdown_table, write_json

__all__ = [
    "ARMS",
    "MEASURES",
    "SweepReportConfig",
    "aggregate_measures",
    "analyze_sweep",
    "arm_of",
    "corpus_of",
    "data_mismatches",
    "loss_contrasts",
    "loss_gaps",
    "pair_twins",
    "paired_contrasts",
    "seed_interval",
    "sweep_records",
    "sweep_trajectories",
    "write_sweep_report",
]

# Display order of the arms (conf/arm/): balance scopes from the most to the least local, then controls.
ARMS = ("sequence", "micro_batch", "global_batch", "aux_free", "none", "hash", "random", "prev_hash", "domain")
# Routers that do not learn: the domain-blind controls and the positive control (the registry's
# `control` role; conf/arm/ has an arm for each).
CONTROLS = tuple(kind for kind in router_kinds() if router_spec(kind).role == "control")
# Per-layer measures aggregated over seeds (keys of `analysis.runs.sweep_rows`), with their meaning.
MEASURES = {
    **{name: m.description for name, m in REGISTRY.items()},
    "nmi_plugin": "NMI, plug-in",
    "nmi_null_q95": "q95 of the plug-in NMI under the document-permutation null",
    "nmi_top1_plugin": "NMI counting each token's top-1 expert, plug-in",
    "cmi_bits": "held-out I(D;E|C) (bits per assignment)",
    "dense_cv": "median noise-corrected damage CV of the active twin's random unit groups",
    "docs_min": "fewest validation documents of a domain",
    **{m.name: m.description for m in PATH_MEASURES.values()},
    "routing_use": "I(D;E) (top-1) over the probe's bits: the share of the input's domain information routing carries",
    "committee_size": "mean size of the expert sets carrying half of each domain's routing mass",
}
TWINS = ("dense_active", "dense_total")


# ----------------------------------------------------------------------------- what a job is
def arm_of(config: Mapping[str, Any]) -> str:
    """The sweep arm a run config belongs to: `dense` (twins only), the control router (`hash`,
    `random`, `prev_hash`, `domain`: the registry's controls), the balance scope where routers adapt
    to the load (`aux_free`, with a router that does), or the balance scope of the default router
    (top-k); other routers as `<router>/<scope>`."""
    if config.get("twin", {}).get("only"):
        return "dense"
    kind = config.get("router", {}).get("kind", RouterConfig.kind)
    scope = config.get("balance", {}).get("scope")
    if kind in CONTROLS:
        return kind
    if scope in ADAPTIVE_SCOPES and kind in router_kinds() and router_spec(kind).adapts_to_load:
        return scope
    return scope if kind == RouterConfig.kind else f"{kind}/{scope}"


def corpus_of(config: Mapping[str, Any]) -> str:
    """A short name of the run's corpus: `builtin`, `synthetic(overlap=0.5)`, or `<source>:<where>`."""
    data = config.get("data", {})
    source = data.get("source")
    if source == "synthetic":
        return f"synthetic(overlap={data.get('synthetic', {}).get('overlap'):g})"
    if source == "local":
        return f"local:{data.get('local', {}).get('path')}"
    if source == "hf":
        return f"hf:{data.get('hf', {}).get('path')}"
    return str(source)


def data_mismatches(runs: Iterable[Run]) -> list[str]:
    """One line per (corpus, seed) whose jobs did not train on the same data stream (their
    data/manifest.json `stream_fingerprint`s differ): their arms are not comparable. [] = all agree."""
    streams: dict[tuple[str, Any], dict[str, list[str]]] = {}
    for run in runs:
        manifest = run.path / "data" / "manifest.json"
        if manifest.is_file():
            fingerprint = json.loads(manifest.read_text())["stream_fingerprint"]
            streams.setdefault((corpus_of(run.config), run.config.get("seed")), {}).setdefault(fingerprint, []).append(
                run.name
            )
    return [
        f"{corpus}, seed {seed}: " + "; ".join(f"{fp}: {', '.join(sorted(names))}" for fp, names in by_fp.items())
        for (corpus, seed), by_fp in streams.items()
        if len(by_fp) > 1
    ]


def pair_twins(runs: Iterable[Run]) -> dict[Path, Run]:
    """{MoE job path: the dense job that trained its twins}: same data stream, model config and
    optimization. MoE jobs without such a job are left out; two candidate dense jobs is an error."""
    runs = list(runs)
    dense: dict[str, Run] = {}
    for run in runs:
        if arm_of(run.config) == "dense":
            key = json.dumps(training_identity(run.path), sort_keys=True)
            if key in dense:
                raise ValueError(
                    f"{dense[key].path} and {run.path} trained the same twins; "
                    "remove one so each MoE job has one control"
                )
            dense[key] = run
    pairs = {}
    for run in runs:
        if run.comparison and "moe" in run.comparison:
            match = dense.get(json.dumps(training_identity(run.path), sort_keys=True))
            if match is not None:
                pairs[run.path] = match
    return pairs


# ----------------------------------------------------------------------------- analysis
def analyze_sweep(
    sweep: Sweep,
    cfg: AnalysisConfig | None = None,
    *,
    reanalyze: bool = False,
    batch_size: int = 16,
    device: str = "cpu",
) -> list[Path]:
    """Analyze every MoE job of `sweep` that has no analysis yet (all with `reanalyze`), with the
    active twin of its dense job as control; returns the analyzed run paths. A MoE job without a
    dense job is analyzed with the twin of its own run, if any (a warning says so)."""
    pairs = pair_twins(sweep.runs)
    done = []
    moe_runs = [r for r in sweep.runs if r.comparison and "moe" in r.comparison]
    for i, run in enumerate(progress(moe_runs, desc="sweep jobs")):
        if run.summary is not None and not reanalyze:
            continue
        twin_run = pairs.get(run.path)
        if twin_run is None:
            print(
                f"warning: no dense job matches {run.path} (data, model, optimization); "
                "its knockouts have no dense control unless the run trained its own twin"
            )
        print(f"[{i + 1}/{len(moe_runs)}] analyzing {run.path}", flush=True)
        analyze_run(
            run.path, cfg, twin_run=None if twin_run is None else twin_run.path, batch_size=batch_size, device=device
        )
        done.append(run.path)
    return done


def sweep_trajectories(
    sweep: Sweep,
    cfg: AnalysisConfig | None = None,
    *,
    arms: Sequence[str] = ("micro_batch",),
    seeds: Sequence[int] = (0,),
    min_checkpoints: int = 3,
    recompute: bool = False,
    batch_size: int = 16,
    device: str = "cpu",
) -> dict[Path, Path]:
    """Specialization over training (`analysis.trajectory`) of the MoE jobs of `arms` x `seeds` that
    kept at least `min_checkpoints` checkpoints, into each job's `analysis/trajectory.json` (kept and
    reused unless `recompute`); returns {job path: its trajectory.json}."""
    out = {}
    for run in sweep.runs:
        if not run.comparison or "moe" not in run.comparison:
            continue
        if arm_of(run.config) not in arms or run.config.get("seed") not in seeds:
            continue
        if len(list_checkpoints(checkpoint_dir(run.path, "moe"))) < min_checkpoints:
            continue
        target = run.path / "analysis" / "trajectory.json"
        if recompute or not target.is_file():
            print(f"specialization over training: {run.path}", flush=True)
            points = specialization_over_training(run.path, "moe", cfg, batch_size=batch_size, device=device)
            write_trajectory(points, target.parent, _job_title(run.config))
        out[run.path] = target
    return out


# ----------------------------------------------------------------------------- tables
def sweep_records(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per (analyzed MoE job, MoE layer): `analysis.runs.sweep_rows` plus corpus, arm, seed,
    and the validation loss (nats/token) of the MoE and of each twin, per domain
    (`loss_<model>_<domain>`); `loss_gap` is `analysis.runs.loss_gap` of the job with its dense
    job's twins: MoE minus the active twin, all domains."""
    pairs = pair_twins(sweep.runs)
    records = []
    for run in sweep.runs:
        if run.summary is None or not run.comparison or "moe" not in run.comparison:
            continue
        comparison = dict(run.comparison)
        if run.path in pairs:
            comparison.update(pairs[run.path].comparison or {})
        losses = {
            f"loss_{model}_{domain}": value
            for model in ("moe",) + TWINS
            if model in comparison
            for domain, value in comparison[model]["val_loss"].items()
        }
        gap = loss_gap(comparison)
        for row in sweep_rows(Sweep(sweep.root, [run], sweep.axes)):
            moe_cfg = run.config.get("model", {}).get("moe", {})
            records.append(
                {
                    **row,
                    "corpus": corpus_of(run.config),
                    "arm": arm_of(run.config),
                    "experts": f"top-{moe_cfg.get('top_k')} of {moe_cfg.get('num_experts')}",
                    "seed": run.config.get("seed"),
                    "path": str(run.path),
                    **losses,
                    "loss_dense": losses.get(f"loss_{ACTIVE_TWIN}_all", math.nan),
                    "loss_gap": gap,
                }
            )
    return records


def seed_interval(values: Sequence[float], confidence: float = 0.95, family: int = 1) -> dict[str, float]:
    """Mean of per-seed values and its Student-t interval: mean ± t_{(1+c)/2, n-1} s/sqrt(n), with s
    the sample standard deviation. Non-finite values are left out; fewer than two values give a nan
    interval (one seed says nothing about the spread).

    family > 1 adds `adj_low`/`adj_high`, the Bonferroni interval at confidence 1 - (1 - c)/family:
    all `family` such intervals cover their means together with probability at least c, so a claim
    about any one contrast of the family holds at level c."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    sem = x.std(ddof=1) / math.sqrt(n) if n >= 2 else math.nan

    def half(level: float) -> float:
        return float(stats.t.ppf((1 + level) / 2, n - 1) * sem) if n >= 2 else math.nan

    out = {"mean": mean, "low": mean - half(confidence), "high": mean + half(confidence), "n": n}
    if family > 1:
        adjusted = half(1 - (1 - confidence) / family)
        out.update(adj_low=mean - adjusted, adj_high=mean + adjusted, family=family)
    return out


def _slug(text: str) -> str:
    """`text` as a file-name stem: runs of other characters than letters, digits and '.' become '_'."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _job_title(config: Mapping[str, Any]) -> str:
    return f"{corpus_of(config)}, {arm_of(config)}, seed {config.get('seed')}"


def _arm_key(arm: str) -> tuple[int, str]:
    return (ARMS.index(arm) if arm in ARMS else len(ARMS), arm)


def aggregate_measures(records: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per (corpus, arm, layer): each of `MEASURES` as {mean, low, high, n} over seeds, and the
    layer verdicts' counts over seeds."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["corpus"], r["arm"], r["layer"]), []).append(r)
    out = []
    for corpus, arm, layer in sorted(groups, key=lambda g: (g[0], _arm_key(g[1]), g[2])):
        rows = groups[(corpus, arm, layer)]
        verdicts: dict[str, int] = {}
        for r in rows:
            verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
        out.append(
            {
                "corpus": corpus,
                "arm": arm,
                "layer": layer,
                "seeds": sorted(r["seed"] for r in rows),
                "verdicts": verdicts,
                **{m: seed_interval([r.get(m, math.nan) for r in rows], confidence) for m in MEASURES},
            }
        )
    return out


def paired_contrasts(
    records: Sequence[Mapping[str, Any]],
    baseline: str = "micro_batch",
    measures: Sequence[str] = ("nmi", "cmi", "knockout"),
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """Per (corpus, arm, layer), each measure of the arm minus that of `baseline`, paired by seed
    (the two jobs of a seed share data order, tokenizer and initialization, so the pairing removes
    the run-to-run spread they share), as {mean, low, high, n} plus the Bonferroni interval
    `adj_low`/`adj_high` over the family of all contrasts of that measure on that corpus. Arms
    without the baseline's seeds and the baseline itself are left out."""
    index = {(r["corpus"], r["arm"], r["layer"], r["seed"]): r for r in records}
    groups = sorted(
        {(c, a, layer) for c, a, layer, _ in index if a != baseline}, key=lambda g: (g[0], _arm_key(g[1]), g[2])
    )
    paired = {}
    for corpus, arm, layer in groups:
        seeds = sorted(
            s for c, a, l_, s in index if (c, a, l_) == (corpus, arm, layer) and (corpus, baseline, layer, s) in index
        )
        if seeds:
            paired[(corpus, arm, layer)] = (
                seeds,
                [(index[(corpus, arm, layer, s)], index[(corpus, baseline, layer, s)]) for s in seeds],
            )
    family = {c: sum(1 for key in paired if key[0] == c) for c, _, _ in paired}
    return [
        {
            "corpus": corpus,
            "arm": arm,
            "baseline": baseline,
            "layer": layer,
            "seeds": seeds,
            **{
                m: seed_interval(
                    [a.get(m, math.nan) - b.get(m, math.nan) for a, b in pairs], confidence, family[corpus]
                )
                for m in measures
            },
        }
        for (corpus, arm, layer), (seeds, pairs) in paired.items()
    ]


def loss_contrasts(
    records: Sequence[Mapping[str, Any]], baseline: str = "hash", confidence: float = 0.95
) -> list[dict[str, Any]]:
    """Per (corpus, arm): the MoE's validation loss (nats/token, all domains) minus that of the
    `baseline` arm on the same seed, as {mean, low, high, n} with the Bonferroni interval over the
    corpus' arms (`seed_interval`); negative = the arm beats the baseline."""
    loss = {(r["corpus"], r["arm"], r["seed"]): r.get("loss_moe_all", math.nan) for r in records}
    arms = sorted({(c, a) for c, a, _ in loss if a != baseline}, key=lambda g: (g[0], _arm_key(g[1])))
    seeds = {
        (c, a): sorted(s for c_, a_, s in loss if (c_, a_) == (c, a) and (c, baseline, s) in loss) for c, a in arms
    }
    arms = [g for g in arms if seeds[g]]
    family = {c: sum(1 for c_, _ in arms if c_ == c) for c, _ in arms}
    return [
        {
            "corpus": c,
            "arm": a,
            "baseline": baseline,
            "seeds": seeds[(c, a)],
            "delta": seed_interval(
                [loss[(c, a, s)] - loss[(c, baseline, s)] for s in seeds[(c, a)]], confidence, family[c]
            ),
        }
        for c, a in arms
    ]


def loss_gaps(records: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per (corpus, arm): the MoE's validation loss and its gap to each twin (MoE minus twin,
    nats/token, negative = MoE better), per domain and all together, as {mean, low, high, n} over
    seeds. Gaps are paired: each seed's MoE against the twin of the same seed."""
    per_run: dict[str, Mapping[str, Any]] = {}
    for r in records:
        per_run.setdefault(r["path"], r)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in per_run.values():
        groups.setdefault((r["corpus"], r["arm"]), []).append(r)
    out = []
    for corpus, arm in sorted(groups, key=lambda g: (g[0], _arm_key(g[1]))):
        rows = groups[(corpus, arm)]
        domains = [k[len("loss_moe_") :] for k in rows[0] if k.startswith("loss_moe_")]
        entry: dict[str, Any] = {
            "corpus": corpus,
            "arm": arm,
            "seeds": sorted(r["seed"] for r in rows),
            "loss_moe": {
                d: seed_interval([r.get(f"loss_moe_{d}", math.nan) for r in rows], confidence) for d in domains
            },
        }
        for twin in TWINS:
            entry[f"loss_{twin}"] = {
                d: seed_interval([r.get(f"loss_{twin}_{d}", math.nan) for r in rows], confidence) for d in domains
            }
            entry[f"gap_{twin}"] = {
                d: seed_interval(
                    [r.get(f"loss_moe_{d}", math.nan) - r.get(f"loss_{twin}_{d}", math.nan) for r in rows], confidence
                )
                for d in domains
            }
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- report
def _ci(iv: Mapping[str, float], digits: int = 3) -> str:
    if not np.isfinite(iv["mean"]):
        return "–"
    if not np.isfinite(iv["low"]):
        return f"{iv['mean']:.{digits}f}"
    return f"{iv['mean']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def _adj(iv: Mapping[str, float], digits: int = 3) -> str:
    if "adj_low" not in iv or not np.isfinite(iv["adj_low"]):
        return "–"
    return f"[{iv['adj_low']:.{digits}f}, {iv['adj_high']:.{digits}f}]"


def render_results(
    measures: Sequence[Mapping[str, Any]],
    gaps: Sequence[Mapping[str, Any]],
    confidence: float,
    contrasts: Sequence[Mapping[str, Any]] = (),
    loss_deltas: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The markdown tables of `results.md`."""
    pct = f"{confidence:.0%}"
    lines = [
        "# Specialization sweep",
        "",
        f"Means over seeds with {pct} Student-t intervals `mean [low, high]` (one seed: the value alone).",
        "",
        "## Specialization by arm and layer",
        "",
        "NMI: minus its document-permutation null mean (chance = 0, document clustering removed); the "
        "plug-in NMI beside the q95 of that null; I(D;E\\|C) share: held-out domain information beyond the "
        "context, as a share of H(D\\|C); knockout: median over experts of the percentile among the active "
        "twin's damage-matched unit groups (their median noise-corrected CV alongside); fewest validation "
        "documents of a domain; verdicts: layer verdicts over seeds.",
        "",
    ]
    header = [
        "corpus",
        "arm",
        "layer",
        "NMI − null",
        "NMI plug-in",
        "its null q95",
        "I(D;E|C) share",
        "KO percentile",
        "dense groups' CV",
        "MaxVio",
        "docs",
        "verdicts",
    ]
    rows = [
        [
            m["corpus"],
            m["arm"],
            str(m["layer"]),
            _ci(m["nmi"]),
            _ci(m["nmi_plugin"]),
            _ci(m["nmi_null_q95"]),
            _ci(m["cmi"]),
            _ci(m["knockout"]),
            _ci(m["dense_cv"]),
            _ci(m["maxvio"], 2),
            _ci(m["docs_min"], 0),
            ", ".join(f"{k} {v}" for k, v in sorted(m["verdicts"].items())),
        ]
        for m in measures
    ]
    lines.append(markdown_table(header, rows))
    lines += [
        "",
        "### Counting each token's top-1 expert only",
        "",
        "The same inference on the table of each token's highest-gate expert (OLMoE publishes its "
        "routing counted both ways); the verdicts above count all k slots.",
        "",
    ]
    lines.append(
        markdown_table(
            ["corpus", "arm", "layer", "NMI − null (top-1)", "NMI plug-in (top-1)", "I(D;E|C) share (top-1)"],
            [
                [
                    m["corpus"],
                    m["arm"],
                    str(m["layer"]),
                    _ci(m["nmi_top1"]),
                    _ci(m["nmi_top1_plugin"]),
                    _ci(m["cmi_top1"]),
                ]
                for m in measures
            ],
        )
    )
    if any(np.isfinite(m[name]["mean"]) for m in measures for name in ("committee_overlap", "path_nmi", "probe_info")):
        lines += [
            "",
            "### Committees, the router's input, and paths",
            "",
            "Committee overlap: mean Jaccard overlap across domains of the expert sets carrying half of each "
            "domain's routing mass (low: disjoint committees); probe bits: domain information a held-out linear "
            "probe reads from the router's input; routing use: the layer's top-1 I(D;E) over those bits; path NMI − "
            "null: I(D; path)/H(D) of the tokens' expert paths through all layers minus its document null (one "
            "value per run, repeated on its layers). None of them votes in the verdict.",
            "",
        ]
        lines.append(
            markdown_table(
                [
                    "corpus",
                    "arm",
                    "layer",
                    "committee overlap",
                    "mean committee size",
                    "probe bits",
                    "routing use",
                    "path NMI − null (top-1)",
                    "path NMI − null (top-k sets)",
                ],
                [
                    [
                        m["corpus"],
                        m["arm"],
                        str(m["layer"]),
                        _ci(m["committee_overlap"]),
                        _ci(m["committee_size"], 1),
                        _ci(m["probe_info"]),
                        _ci(m["routing_use"]),
                        _ci(m["path_nmi"]),
                        _ci(m["path_nmi_topk"]),
                    ]
                    for m in measures
                ],
            )
        )
    if contrasts:
        base = contrasts[0]["baseline"]
        family = contrasts[0]["nmi"].get("family", 1)
        lines += [
            "",
            f"## Paired against `{base}`",
            "",
            f"Each arm minus `{base}` on the same seed (same data order, tokenizer and initialization). "
            f"`[low, high]`: the {pct} interval of one contrast; `adj`: the Bonferroni interval over the "
            f"{family} contrasts of the corpus, the one to read before claiming that any single contrast "
            "differs from 0.",
            "",
        ]
        lines.append(
            markdown_table(
                ["corpus", "arm", "layer", "Δ NMI − null", "adj", "Δ I(D;E|C) share", "adj", "Δ KO percentile"],
                [
                    [
                        c["corpus"],
                        c["arm"],
                        str(c["layer"]),
                        _ci(c["nmi"]),
                        _adj(c["nmi"]),
                        _ci(c["cmi"]),
                        _adj(c["cmi"]),
                        _ci(c["knockout"]),
                    ]
                    for c in contrasts
                ],
            )
        )
    if loss_deltas:
        base = loss_deltas[0]["baseline"]
        lines += [
            "",
            f"## Validation loss against `{base}`",
            "",
            f"Each arm's MoE loss minus the `{base}` MoE's on the same seed (nats/token, all domains; negative: "
            f"the arm beats `{base}`), with the Bonferroni interval over the corpus' arms (`adj`).",
            "",
        ]
        lines.append(
            markdown_table(
                ["corpus", "arm", "seeds", "Δ loss", "adj"],
                [[d["corpus"], d["arm"], str(len(d["seeds"])), _ci(d["delta"]), _adj(d["delta"])] for d in loss_deltas],
            )
        )
    lines += [
        "",
        "## Validation loss against the dense twins",
        "",
        "Loss in nats/token on all domains' validation tokens; gaps are MoE minus twin, paired by seed "
        "(negative: the MoE is better).",
        "",
    ]
    header = ["corpus", "arm", "MoE", "active twin", "total twin", "MoE − active", "MoE − total"]
    rows = [
        [
            g["corpus"],
            g["arm"],
            _ci(g["loss_moe"]["all"]),
            _ci(g["loss_dense_active"]["all"]),
            _ci(g["loss_dense_total"]["all"]),
            _ci(g["gap_dense_active"]["all"]),
            _ci(g["gap_dense_total"]["all"]),
        ]
        for g in gaps
        if "all" in g["loss_moe"]
    ]
    lines.append(markdown_table(header, rows))
    domains = list(dict.fromkeys(d for g in gaps for d in g["gap_dense_active"] if d != "all"))
    if domains:
        lines += ["", "### MoE − active twin per domain", ""]
        rows = [
            [g["corpus"], g["arm"]]
            + [_ci(g["gap_dense_active"][d]) if d in g["gap_dense_active"] else "–" for d in domains]
            for g in gaps
        ]
        lines.append(markdown_table(["corpus", "arm"] + domains, rows))
    return "\n".join(lines) + "\n"


def anchor_comparison(
    measures: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """OLMoE's and Mixtral's published routing counts (`analysis.anchors`) scored by the package,
    then the sweep's arms on the same scale: NMI = I(D;E)/H(D) plug-in counting the top-1 expert
    and counting all k slots (the package's default, the counterpart of OLMoE's top-8 table), and
    I(D;E) in bits (all slots). One row per (source, layer)."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for a in anchor_rows():
        row = rows.setdefault((a["model"], a["layer"]), {"source": a["model"], "layer": a["layer"]})
        if a["counting"] == "top1":
            row["nmi_top1"] = a["nmi"]
        else:
            row.update(
                nmi_topk=a["nmi"],
                mi_topk_bits=a["mi_bits"],
                experts=f"top-{a['K']} of {a['E']}",
                tokens=a["assignments"] // a["K"],
            )
    out = list(rows.values())
    experts = {(r["corpus"], r["arm"]): r.get("experts") for r in records}
    for m in measures:
        out.append(
            {
                "source": f"{m['corpus']} / {m['arm']}",
                "layer": m["layer"],
                "experts": experts.get((m["corpus"], m["arm"])),
                "nmi_top1": m["nmi_top1_plugin"]["mean"],
                "nmi_topk": m["nmi_plugin"]["mean"],
                "mi_topk_bits": m["mi_domain"]["mean"],
                "nmi_minus_null": m["nmi"]["mean"],
                "tokens": None,
            }
        )
    return out


def write_sweep_report(
    sweep: Sweep, out_dir: str | Path, confidence: float = 0.95, trajectories: Mapping[Path, Path] | None = None
) -> dict[str, Any]:
    """runs.csv, aggregate.json, results.md and figures/ of an analyzed sweep into `out_dir`;
    returns the aggregate (the content of aggregate.json). trajectories: {job path: its
    trajectory.json} (`sweep_trajectories`), plotted and tabulated per job."""
    mismatched = data_mismatches(sweep.runs)
    if mismatched:
        raise ValueError(
            "jobs of one corpus and seed trained on different data, so their arms cannot be compared:\n  "
            + "\n  ".join(mismatched)
            + "\nThe built-in corpus reads the licence files of the installed "
            "packages: installing or upgrading a package during a sweep changes it. Rerun the odd jobs "
            "in the environment of the others (or all of them in one environment)."
        )
    records = sweep_records(sweep)
    if not records:
        raise ValueError(
            f"no analyzed MoE job under {sweep.root}; run `moe-sweep sweep_dir={sweep.root}` "
            "(it analyzes them) or train the sweep first"
        )
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: r.get(k) for k in columns} for r in records])
    measures, gaps = aggregate_measures(records, confidence), loss_gaps(records, confidence)
    contrasts = paired_contrasts(records, confidence=confidence)
    loss_deltas = loss_contrasts(records, confidence=confidence)
    anchors = anchor_comparison(measures, records)
    curves = _trajectory_entries(sweep, trajectories or {})
    aggregate = {
        "confidence": confidence,
        "measures": measures,
        "contrasts": contrasts,
        "loss": gaps,
        "loss_contrasts": loss_deltas,
        "anchors": anchors,
        "anchor_source": anchor_source(),
        "trajectories": curves,
        "descriptions": MEASURES,
    }
    write_json(out / "aggregate.json", aggregate, indent=2)
    figures = {
        "measures_by_arm": plot_arm_intervals(measures, ("nmi", "cmi", "knockout", "maxvio"), descriptions=MEASURES)
    }
    for corpus in dict.fromkeys(r["corpus"] for r in records):
        rows = sorted((r for r in records if r["corpus"] == corpus), key=lambda r: (_arm_key(r["arm"]), r["seed"]))
        fig = plot_sweep(rows, by="arm", metrics=("nmi", "cmi", "knockout", "maxvio", "loss_gap"))
        fig.suptitle(f"{corpus}: every seed (x: arm; side by side: seeds)")
        figures["seeds_" + _slug(corpus)] = fig
    for curve in curves:
        figures[curve["figure"]] = plot_trajectory(curve["points"], curve["title"])
    text = render_results(measures, gaps, confidence, contrasts, loss_deltas)
    text += render_anchors(anchors) + render_trajectories(curves)
    text += "\n## Figures\n\n" + "\n".join(f"![{name}](figures/{name}.png)" for name in figures) + "\n"
    for name, fig in figures.items():
        save_figure(fig, name, out / "figures")
    (out / "results.md").write_text(text)
    return aggregate


def _trajectory_entries(sweep: Sweep, trajectories: Mapping[Path, Path]) -> list[dict[str, Any]]:
    by_path = {run.path: run for run in sweep.runs}
    out = []
    for path, file in trajectories.items():
        config = by_path[path].config
        corpus, arm, seed = corpus_of(config), arm_of(config), config.get("seed")
        out.append(
            {
                "corpus": corpus,
                "arm": arm,
                "seed": seed,
                "path": str(path),
                "title": _job_title(config),
                "figure": "trajectory_" + _slug(f"{corpus}_{arm}_seed{seed}"),
                "points": json.loads(Path(file).read_text()),
            }
        )
    return sorted(out, key=lambda c: (c["corpus"], _arm_key(c["arm"]), c["seed"]))


def _num(x: Any, digits: int = 3) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def render_anchors(anchors: Sequence[Mapping[str, Any]]) -> str:
    """The table that sets the published models' routing beside the sweep's, on one scale."""
    lines = [
        "",
        "## Against the published record",
        "",
        "OLMoE-1B-7B and Mixtral-8x7B: the routing counts released with the OLMoE paper (allenai/OLMoE, "
        "`scripts/routing_output/`), shipped in `analysis/data/` and scored here by the package's own "
        "functions. NMI = I(D;E)/H(D), plug-in, counting each token's top-1 expert or all its k slots; "
        "all k slots is what the package counts, so OLMoE's top-8 column is the like-for-like one. "
        "The sweep's plug-in NMIs carry the small-sample bias that `NMI − null` removes (their counts "
        "hold about 10^5 tokens, the published ones 10^6).",
        "",
    ]
    header = ["source", "layer", "experts", "NMI top-1", "NMI all k", "I(D;E) all k (bits)", "NMI − null"]
    rows = [
        [
            a["source"],
            str(a["layer"]),
            str(a.get("experts") or "–"),
            _num(a.get("nmi_top1")),
            _num(a.get("nmi_topk")),
            _num(a.get("mi_topk_bits")),
            _num(a.get("nmi_minus_null")),
        ]
        for a in anchors
    ]
    return "\n".join(lines + [markdown_table(header, rows)]) + "\n"


def render_trajectories(curves: Sequence[Mapping[str, Any]]) -> str:
    """Per followed job and layer: the measures at its first, middle and last kept checkpoint."""
    if not curves:
        return ""
    lines = [
        "",
        "## Specialization over training",
        "",
        "Routing of the same validation tokens at each kept checkpoint; saturation = the share of each "
        "token's final experts it is already routed to (OLMoE sec. 5).",
        "",
    ]
    rows = []
    for c in curves:
        points = c["points"]
        picks = list(dict.fromkeys([0, len(points) // 4, len(points) // 2, len(points) - 1]))
        for layer in range(len(points[0]["layers"])):
            for i in picks:
                p, entry = points[i], points[i]["layers"][layer]
                rows.append(
                    [
                        c["title"],
                        str(layer),
                        f"{p['tokens_seen'] / 1e6:.2f}M",
                        _num(entry["nmi"]["value"]),
                        _num(entry["cmi"]["value"]),
                        _num(entry["saturation"]),
                    ]
                )
    lines.append(markdown_table(["job", "layer", "tokens seen", "NMI − null", "I(D;E|C) share", "saturation"], rows))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI
@dataclass
class SweepReportConfig:
    sweep_dir: str = (
        MISSING  # a `moe-train -m` directory, e.g. multirun/2026-11-28/10-00-00; report: <sweep_dir>/summary
    )
    reanalyze: bool = False  # analyze MoE jobs that already have analysis/summary.json (and trajectory.json) again
    # Specialization over training (`analysis.trajectory`) for the MoE jobs of these arms and seeds
    # that kept at least 3 checkpoints (e.g. experiment=loss_budget).
    trajectory_arms: list[str] = field(default_factory=lambda: ["micro_batch"])
    trajectory_seeds: list[int] = field(default_factory=lambda: [0])
    confidence: float = 0.95  # of the intervals over seeds
    batch_size: int = 16
    device: str = "cpu"
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


def _register() -> None:
    store = ConfigStore.instance()
    store.store(name="sweep_schema", node=SweepReportConfig)
    conf = importlib.resources.files("moe.conf")
    store.store(name="sweep", node=OmegaConf.create(conf.joinpath("sweep.yaml").read_text()))


_register()


@hydra.main(version_base="1.3", config_path=None, config_name="sweep")
def main(dict_cfg: DictConfig) -> None:
    cfg = config_object(SweepReportConfig, dict_cfg)
    sweep = load_sweep(cfg.sweep_dir)
    analyze_sweep(sweep, cfg.analysis, reanalyze=cfg.reanalyze, batch_size=cfg.batch_size, device=cfg.device)
    trajectories = sweep_trajectories(
        sweep,
        cfg.analysis,
        arms=cfg.trajectory_arms,
        seeds=cfg.trajectory_seeds,
        recompute=cfg.reanalyze,
        batch_size=cfg.batch_size,
        device=cfg.device,
    )
    sweep = Sweep(sweep.root, [load_run(r.path, need_summary=False) for r in sweep.runs], sweep.axes)
    out = Path(cfg.sweep_dir) / "summary"
    write_sweep_report(sweep, out, cfg.confidence, trajectories)
    print(f"sweep report: {out}/results.md")


if __name__ == "__main__":
    main()
