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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from scipy import stats

from analysis.measures import MEASURES as REGISTRY
from analysis.plots import plot_arm_intervals, plot_sweep, save_figure
from analysis.report import AnalysisConfig
from analysis.run import analyze_run, training_identity
from analysis.runs import Run, Sweep, load_run, load_sweep, sweep_rows

__all__ = [
    "ARMS",
    "MEASURES",
    "SweepReportConfig",
    "aggregate_measures",
    "analyze_sweep",
    "arm_of",
    "corpus_of",
    "loss_gaps",
    "pair_twins",
    "paired_contrasts",
    "seed_interval",
    "sweep_records",
    "write_sweep_report",
]

# Display order of the arms (conf/arm/): balance scopes from the most to the least local, then controls.
ARMS = ("sequence", "micro_batch", "global_batch", "aux_free", "none", "hash", "random")
# Per-layer measures aggregated over seeds (keys of `analysis.runs.sweep_rows`), with their meaning.
MEASURES = {**{name: m.description for name, m in REGISTRY.items()},
            "nmi_plugin": "NMI, plug-in",
            "nmi_null_q95": "q95 of the plug-in NMI under the document-permutation null",
            "cmi_bits": "held-out I(D;E|C) (bits per assignment)",
            "dense_cv": "median noise-corrected damage CV of the active twin's random unit groups",
            "docs_min": "fewest validation documents of a domain"}
TWINS = ("dense_active", "dense_total")


# ----------------------------------------------------------------------------- what a job is
def arm_of(config: Mapping[str, Any]) -> str:
    """The sweep arm a run config belongs to: `dense` (twins only), the control router (`hash`,
    `random`), `aux_free`, or the balance scope of a top-k router; other routers as
    `<router>/<scope>`."""
    if config.get("twin", {}).get("only"):
        return "dense"
    kind = config.get("router", {}).get("kind")
    scope = config.get("balance", {}).get("scope")
    if kind in ("hash", "random"):
        return kind
    if scope == "aux_free" and kind == "sigmoid":
        return "aux_free"
    return scope if kind == "topk" else f"{kind}/{scope}"


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


def pair_twins(runs: Iterable[Run]) -> dict[Path, Run]:
    """{MoE job path: the dense job that trained its twins}: same data stream, model config and
    optimization. MoE jobs without such a job are left out; two candidate dense jobs is an error."""
    runs = list(runs)
    dense: dict[str, Run] = {}
    for run in runs:
        if arm_of(run.config) == "dense":
            key = json.dumps(training_identity(run.path), sort_keys=True)
            if key in dense:
                raise ValueError(f"{dense[key].path} and {run.path} trained the same twins; "
                                 "remove one so each MoE job has one control")
            dense[key] = run
    pairs = {}
    for run in runs:
        if run.comparison and "moe" in run.comparison:
            match = dense.get(json.dumps(training_identity(run.path), sort_keys=True))
            if match is not None:
                pairs[run.path] = match
    return pairs


# ----------------------------------------------------------------------------- analysis
def analyze_sweep(sweep: Sweep, cfg: AnalysisConfig | None = None, *, reanalyze: bool = False,
                  batch_size: int = 16, device: str = "cpu") -> list[Path]:
    """Analyze every MoE job of `sweep` that has no analysis yet (all with `reanalyze`), with the
    active twin of its dense job as control; returns the analyzed run paths. A MoE job without a
    dense job is analyzed with the twin of its own run, if any (a warning says so)."""
    pairs = pair_twins(sweep.runs)
    done = []
    moe_runs = [r for r in sweep.runs if r.comparison and "moe" in r.comparison]
    for i, run in enumerate(moe_runs):
        if run.summary is not None and not reanalyze:
            continue
        twin_run = pairs.get(run.path)
        if twin_run is None:
            print(f"warning: no dense job matches {run.path} (data, model, optimization); "
                  "its knockouts have no dense control unless the run trained its own twin")
        print(f"[{i + 1}/{len(moe_runs)}] analyzing {run.path}", flush=True)
        analyze_run(run.path, cfg, twin_run=None if twin_run is None else twin_run.path,
                    batch_size=batch_size, device=device)
        done.append(run.path)
    return done


# ----------------------------------------------------------------------------- tables
def sweep_records(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per (analyzed MoE job, MoE layer): `analysis.runs.sweep_rows` plus corpus, arm, seed,
    and the validation loss (nats/token) of the MoE and of each twin, per domain
    (`loss_<model>_<domain>`); `loss_gap` is MoE minus the active twin, all domains."""
    pairs = pair_twins(sweep.runs)
    records = []
    for run in sweep.runs:
        if run.summary is None or not run.comparison or "moe" not in run.comparison:
            continue
        comparison = dict(run.comparison)
        if run.path in pairs:
            comparison.update(pairs[run.path].comparison or {})
        losses = {f"loss_{model}_{domain}": value for model in ("moe",) + TWINS if model in comparison
                  for domain, value in comparison[model]["val_loss"].items()}
        gap = losses.get("loss_moe_all", math.nan) - losses.get("loss_dense_active_all", math.nan)
        for row in sweep_rows(Sweep(sweep.root, [run], sweep.axes)):
            records.append({**row, "corpus": corpus_of(run.config), "arm": arm_of(run.config),
                            "seed": run.config.get("seed"), "path": str(run.path), **losses,
                            "loss_dense": losses.get("loss_dense_active_all", math.nan), "loss_gap": gap})
    return records


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of per-seed values and its Student-t interval: mean ± t_{(1+c)/2, n-1} s/sqrt(n), with s
    the sample standard deviation. Non-finite values are left out; fewer than two values give a nan
    interval (one seed says nothing about the spread)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": 1}
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def _arm_key(arm: str) -> tuple[int, str]:
    return (ARMS.index(arm) if arm in ARMS else len(ARMS), arm)


def aggregate_measures(records: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per (corpus, arm, layer): each of `MEASURES` as {mean, low, high, n} over seeds, and the
    layer verdicts' counts over seeds."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["corpus"], r["arm"], r["layer"]), []).append(r)
    out = []
    for (corpus, arm, layer) in sorted(groups, key=lambda g: (g[0], _arm_key(g[1]), g[2])):
        rows = groups[(corpus, arm, layer)]
        verdicts: dict[str, int] = {}
        for r in rows:
            verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
        out.append({"corpus": corpus, "arm": arm, "layer": layer, "seeds": sorted(r["seed"] for r in rows),
                    "verdicts": verdicts,
                    **{m: seed_interval([r.get(m, math.nan) for r in rows], confidence) for m in MEASURES}})
    return out


def paired_contrasts(records: Sequence[Mapping[str, Any]], baseline: str = "micro_batch",
                     measures: Sequence[str] = ("nmi", "cmi", "knockout"),
                     confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per (corpus, arm, layer), each measure of the arm minus that of `baseline`, paired by seed
    (the two jobs of a seed share data order, tokenizer and initialization, so the pairing removes
    the run-to-run spread they share), as {mean, low, high, n}. Arms without the baseline's seeds
    and the baseline itself are left out."""
    index = {(r["corpus"], r["arm"], r["layer"], r["seed"]): r for r in records}
    groups = sorted({(c, a, layer) for c, a, layer, _ in index if a != baseline},
                    key=lambda g: (g[0], _arm_key(g[1]), g[2]))
    out = []
    for corpus, arm, layer in groups:
        seeds = sorted(s for c, a, l_, s in index
                       if (c, a, l_) == (corpus, arm, layer) and (corpus, baseline, layer, s) in index)
        if not seeds:
            continue
        pairs = [(index[(corpus, arm, layer, s)], index[(corpus, baseline, layer, s)]) for s in seeds]
        out.append({"corpus": corpus, "arm": arm, "baseline": baseline, "layer": layer, "seeds": seeds,
                    **{m: seed_interval([a.get(m, math.nan) - b.get(m, math.nan) for a, b in pairs], confidence)
                       for m in measures}})
    return out


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
    for (corpus, arm) in sorted(groups, key=lambda g: (g[0], _arm_key(g[1]))):
        rows = groups[(corpus, arm)]
        domains = [k[len("loss_moe_"):] for k in rows[0] if k.startswith("loss_moe_")]
        entry: dict[str, Any] = {"corpus": corpus, "arm": arm, "seeds": sorted(r["seed"] for r in rows),
                                 "loss_moe": {d: seed_interval([r.get(f"loss_moe_{d}", math.nan) for r in rows],
                                                               confidence) for d in domains}}
        for twin in TWINS:
            entry[f"loss_{twin}"] = {d: seed_interval([r.get(f"loss_{twin}_{d}", math.nan) for r in rows], confidence)
                                     for d in domains}
            entry[f"gap_{twin}"] = {d: seed_interval([r.get(f"loss_moe_{d}", math.nan) - r.get(f"loss_{twin}_{d}", math.nan)
                                                      for r in rows], confidence) for d in domains}
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- report
def _ci(iv: Mapping[str, float], digits: int = 3) -> str:
    if not np.isfinite(iv["mean"]):
        return "–"
    if not np.isfinite(iv["low"]):
        return f"{iv['mean']:.{digits}f}"
    return f"{iv['mean']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_results(measures: Sequence[Mapping[str, Any]], gaps: Sequence[Mapping[str, Any]],
                   confidence: float, contrasts: Sequence[Mapping[str, Any]] = ()) -> str:
    """The markdown tables of `results.md`."""
    pct = f"{confidence:.0%}"
    lines = ["# Specialization sweep", "",
             f"Means over seeds with {pct} Student-t intervals `mean [low, high]` (one seed: the value alone).", "",
             "## Specialization by arm and layer", "",
             "NMI: minus its document-permutation null mean (chance = 0, document clustering removed); the "
             "plug-in NMI beside the q95 of that null; I(D;E\\|C) share: held-out domain information beyond the "
             "context, as a share of H(D\\|C); knockout: median over experts of the percentile among the active "
             "twin's damage-matched unit groups (their median noise-corrected CV alongside); fewest validation "
             "documents of a domain; verdicts: layer verdicts over seeds.", ""]
    header = ["corpus", "arm", "layer", "NMI − null", "NMI plug-in", "its null q95", "I(D;E\\|C) share",
              "KO percentile", "dense groups' CV", "MaxVio", "docs", "verdicts"]
    rows = [[m["corpus"], m["arm"], str(m["layer"]), _ci(m["nmi"]), _ci(m["nmi_plugin"]), _ci(m["nmi_null_q95"]),
             _ci(m["cmi"]),
             _ci(m["knockout"]), _ci(m["dense_cv"]), _ci(m["maxvio"], 2), _ci(m["docs_min"], 0),
             ", ".join(f"{k} {v}" for k, v in sorted(m["verdicts"].items()))] for m in measures]
    lines += _md(header, rows)
    if contrasts:
        base = contrasts[0]["baseline"]
        lines += ["", f"## Paired against `{base}`", "",
                  f"Each arm minus `{base}` on the same seed (same data order, tokenizer and initialization); "
                  "an interval that excludes 0 is a difference the seeds agree on.", ""]
        lines += _md(["corpus", "arm", "layer", "Δ NMI − null", "Δ I(D;E\\|C) share", "Δ KO percentile"],
                     [[c["corpus"], c["arm"], str(c["layer"]), _ci(c["nmi"]), _ci(c["cmi"]),
                       _ci(c["knockout"])] for c in contrasts])
    lines += ["", "## Validation loss against the dense twins", "",
              "Loss in nats/token on all domains' validation tokens; gaps are MoE minus twin, paired by seed "
              "(negative: the MoE is better).", ""]
    header = ["corpus", "arm", "MoE", "active twin", "total twin", "MoE − active", "MoE − total"]
    rows = [[g["corpus"], g["arm"], _ci(g["loss_moe"]["all"]), _ci(g["loss_dense_active"]["all"]),
             _ci(g["loss_dense_total"]["all"]), _ci(g["gap_dense_active"]["all"]), _ci(g["gap_dense_total"]["all"])]
            for g in gaps if "all" in g["loss_moe"]]
    lines += _md(header, rows)
    domains = list(dict.fromkeys(d for g in gaps for d in g["gap_dense_active"] if d != "all"))
    if domains:
        lines += ["", "### MoE − active twin per domain", ""]
        rows = [[g["corpus"], g["arm"]] + [_ci(g["gap_dense_active"][d]) if d in g["gap_dense_active"] else "–"
                                           for d in domains] for g in gaps]
        lines += _md(["corpus", "arm"] + domains, rows)
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_sweep_report(sweep: Sweep, out_dir: str | Path, confidence: float = 0.95) -> dict[str, Any]:
    """runs.csv, aggregate.json, results.md and figures/ of an analyzed sweep into `out_dir`;
    returns the aggregate (the content of aggregate.json)."""
    records = sweep_records(sweep)
    if not records:
        raise ValueError(f"no analyzed MoE job under {sweep.root}; run `moe-sweep sweep_dir={sweep.root}` "
                         "(it analyzes them) or train the sweep first")
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: r.get(k) for k in columns} for r in records])
    measures, gaps = aggregate_measures(records, confidence), loss_gaps(records, confidence)
    contrasts = paired_contrasts(records, confidence=confidence)
    aggregate = {"confidence": confidence, "measures": measures, "contrasts": contrasts, "loss": gaps,
                 "descriptions": MEASURES}
    (out / "aggregate.json").write_text(json.dumps(_jsonable(aggregate), indent=2))
    figures = {"measures_by_arm": plot_arm_intervals(measures, ("nmi", "cmi", "knockout", "maxvio"),
                                                     descriptions=MEASURES)}
    for corpus in dict.fromkeys(r["corpus"] for r in records):
        rows = sorted((r for r in records if r["corpus"] == corpus), key=lambda r: (_arm_key(r["arm"]), r["seed"]))
        fig = plot_sweep(rows, by="arm", metrics=("nmi", "cmi", "knockout", "maxvio", "loss_gap"))
        fig.suptitle(f"{corpus}: every seed (x: arm; side by side: seeds)")
        figures["seeds_" + re.sub(r"[^A-Za-z0-9.]+", "_", corpus).strip("_")] = fig
    text = render_results(measures, gaps, confidence, contrasts)
    text += "\n## Figures\n\n" + "\n".join(f"![{name}](figures/{name}.png)" for name in figures) + "\n"
    for name, fig in figures.items():
        save_figure(fig, name, out / "figures")
    (out / "results.md").write_text(text)
    return aggregate


# ----------------------------------------------------------------------------- CLI
@dataclass
class SweepReportConfig:
    sweep_dir: str = MISSING  # a `moe-train -m` directory, e.g. multirun/2026-11-28/10-00-00; report: <sweep_dir>/summary
    reanalyze: bool = False  # analyze MoE jobs that already have analysis/summary.json again
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
    cfg: SweepReportConfig = OmegaConf.to_object(dict_cfg)
    sweep = load_sweep(cfg.sweep_dir)
    analyze_sweep(sweep, cfg.analysis, reanalyze=cfg.reanalyze, batch_size=cfg.batch_size, device=cfg.device)
    sweep = Sweep(sweep.root, [load_run(r.path, need_summary=False) for r in sweep.runs], sweep.axes)
    out = Path(cfg.sweep_dir) / "summary"
    write_sweep_report(sweep, out, cfg.confidence)
    print(f"sweep report: {out}/results.md")


if __name__ == "__main__":
    main()
