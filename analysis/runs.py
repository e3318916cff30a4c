"""Read `moe-train` run directories and multirun sweeps (for the notebooks and scripts).

    run = load_run("outputs/2026-11-28/10-00-00")
    run.summary                # analysis/summary.json (keys in `analysis.report`)
    run.comparison             # comparison.json: per model, val_loss {domain: nats}, sizes, throughput
    run.metrics["moe"]         # models/moe/metrics.jsonl, one dict per line
    run.val_curves()           # {model: {domain: (steps [n], loss [n])}}
    run.records()              # analysis/routing.npz as `analysis.records.RoutingRecords`

    sweep = load_sweep("multirun/2026-11-28/10-00-00")
    sweep.axes                 # config keys that differ between its runs, e.g. ["balance.scope", "seed"]
    sweep_rows(sweep)          # one flat row per (run, MoE layer): NMI, I(D;E|T), knockouts, CKA, losses

A run directory is any directory holding `comparison.json` or `analysis/summary.json`; a sweep
directory is any directory above several of them (Hydra's `multirun/<date>/<time>/`, whose
sub-directories are the jobs). Only reading and reshaping here: the measures live in
`analysis.information` / `analysis.report`, the figures in `analysis.plots`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from omegaconf import OmegaConf

from analysis.information import contingency
from analysis.measures import MEASURES
from analysis.paths import PATH_MEASURES
from analysis.records import RoutingRecords
from analysis.registry import columns
from moe.tables import format_number
from moe.tables import markdown_table as _markdown_table
from moe.validation import check_choice

# summary["paths"] mode -> the name of its columns in the sweep rows.
PATH_COLUMNS = {mode: measure.name for mode, measure in PATH_MEASURES.items()}

__all__ = [
    "Run",
    "Sweep",
    "domain_expert_from_records",
    "find_runs",
    "flatten_config",
    "load_run",
    "load_sweep",
    "loss_gap",
    "markdown_table",
    "newest_run",
    "run_overview",
    "sweep_rows",
    "val_loss_curves",
    "varying_keys",
]

SUMMARY = Path("analysis") / "summary.json"
RECORDS = Path("analysis") / "routing.npz"
# The dense twin the MoE's loss gap is measured against: the active-parameter matched one.
ACTIVE_TWIN = "dense_active"


# ----------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Run:
    """The recorded files of one run directory; `summary` is None when it was not analyzed."""

    path: Path
    config: dict[str, Any]
    comparison: dict[str, Any] | None
    summary: dict[str, Any] | None
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def val_curves(self) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Validation loss over training steps: {model: {domain: (steps, nats)}} (models without
        evaluations are left out)."""
        curves = {name: val_loss_curves(lines) for name, lines in self.metrics.items()}
        return {name: c for name, c in curves.items() if c}

    def report(self, figures: bool = False) -> str:
        """analysis/report.md; without its figure links (relative paths) unless `figures`."""
        text = (self.path / "analysis" / "report.md").read_text()
        return text if figures else text.split("\n## Figures", 1)[0]

    def records(self) -> RoutingRecords:
        """The raw per-token routing records of the analysis (`analysis/routing.npz`)."""
        path = self.path / RECORDS
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: the analysis ran with save_records=false, "
                f"or not at all (`moe-analyze run_dir={self.path}`)"
            )
        return RoutingRecords.load(path)


def _read_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml as plain data (what `moe.config.config_dict` does; not imported, as
    moe.config imports the model and this module stays torch-free)."""
    config = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a mapping")
    return cast(dict[str, Any], config)  # OmegaConf types keys as any DictKeyType; config keys are str


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _is_run(path: Path) -> bool:
    return (path / "comparison.json").is_file() or (path / SUMMARY).is_file()


def load_run(run_dir: str | Path, *, need_summary: bool = True) -> Run:
    """Read a run directory made by `moe-train` (config.yaml, comparison.json,
    models/*/metrics.jsonl, analysis/summary.json).

    Raises FileNotFoundError naming the fix when `run_dir` is not a run directory, or (with
    `need_summary`) when its analysis is missing.
    """
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    if not _is_run(path):
        raise FileNotFoundError(
            f"{path} is not a moe-train run directory (no comparison.json or {SUMMARY}); "
            "a multirun sweep directory goes to load_sweep()"
        )
    summary_file = path / SUMMARY
    if need_summary and not summary_file.is_file():
        raise FileNotFoundError(
            f"{summary_file} does not exist: analyze the run first "
            f"(`moe-analyze run_dir={path}`, or train with analyze=true)"
        )
    config_file = path / "config.yaml"
    comparison_file = path / "comparison.json"
    metrics = {p.parent.name: _read_jsonl(p) for p in sorted(path.glob("models/*/metrics.jsonl"))}
    return Run(
        path=path,
        config=_read_config(config_file) if config_file.is_file() else {},
        comparison=json.loads(comparison_file.read_text()) if comparison_file.is_file() else None,
        summary=json.loads(summary_file.read_text()) if summary_file.is_file() else None,
        metrics=metrics,
    )


def val_loss_curves(lines: Iterable[Mapping[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{domain: (steps [n] int, loss [n] nats)} from the evaluation lines of a metrics.jsonl
    (`{"step": s, "val_loss": {domain: nats, "all": nats}}`), in step order; {} without evaluations.
    A step evaluated twice (a resumed run) keeps its last value."""
    by_step: dict[int, Mapping[str, float]] = {}
    for line in lines:
        if "val_loss" in line:
            by_step[int(line["step"])] = line["val_loss"]
    steps = sorted(by_step)
    domains = list(dict.fromkeys(d for s in steps for d in by_step[s]))
    out = {}
    for d in domains:
        pts = [(s, by_step[s][d]) for s in steps if by_step[s].get(d) is not None]
        out[d] = (np.array([p[0] for p in pts], dtype=np.int64), np.array([p[1] for p in pts], dtype=np.float64))
    return out


def domain_expert_from_records(records: RoutingRecords, layer: int, weighting: str = "count") -> np.ndarray:
    """[G, E] domain x expert table of one layer from the raw records: kept assignments counted once
    (`weighting="count"`, equal to the summary's `domain_expert_counts`) or weighted by their gate
    (`"gate"`: a token's mass is split by how much each chosen expert contributes). Dropped slots
    (capacity overflow) count for nothing."""
    check_choice("weighting", weighting, ("count", "gate"))
    if not -len(records.layers) <= layer < len(records.layers):
        raise ValueError(f"layer {layer} out of range: the records hold {len(records.layers)} MoE layers")
    rec = records.layers[layer]
    weights = np.where(rec.kept, rec.gates if weighting == "gate" else 1.0, 0.0).astype(np.float64)
    return contingency(
        records.domain, rec.experts.astype(np.int64), len(records.domains), records.num_experts, weights=weights
    )


def _verdict_line(summary: Mapping[str, Any]) -> list[str]:
    v = summary["verdict"]
    lines = [f"**Verdict: {v['verdict']}** ({v['rule']})", ""]
    for layer in summary["layers"]:
        crit = ", ".join(f"{c['name']}: {c['verdict']}" for c in layer["verdict"]["criteria"].values())
        verdict = layer["verdict"]["verdict"]
        lines.append(f"- MoE layer {layer['layer']} (block {layer['block']}): **{verdict}** ({crit})")
    return lines


def run_overview(run: Run) -> str:
    """A short markdown description of a run: where it is, what was trained, the verdict per layer."""
    cfg, lines = run.config, [f"Run `{run.path}`", ""]
    if cfg:
        moe = cfg.get("model", {}).get("moe", {})
        lines.append(
            f"- data `{cfg.get('data', {}).get('source')}`, router `{cfg.get('router', {}).get('kind')}`, "
            f"balance `{cfg.get('balance', {}).get('scope')}`, E = {moe.get('num_experts')}, "
            f"k = {moe.get('top_k')}, {cfg.get('trainer', {}).get('max_steps')} steps, seed {cfg.get('seed')}"
        )
    if run.comparison:
        losses = ", ".join(
            f"{name} {row['val_loss']['all']:.4f}"
            for name, row in run.comparison.items()
            if row.get("val_loss", {}).get("all") is not None
        )
        lines.append(f"- final validation loss, all domains (nats/token): {losses}")
    if run.summary:
        s = run.summary
        lines.append(
            f"- analysis: {s['tokens']['recorded']} validation tokens of {len(s['domains'])} domains "
            f"({', '.join(s['domains'])}), {s['model']['num_moe_layers']} MoE layers"
        )
        lines += [""] + _verdict_line(s)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- several runs
def find_runs(root: str | Path) -> list[Path]:
    """Every run directory at or below `root` (holding comparison.json or analysis/summary.json),
    sorted by path."""
    root = Path(root).expanduser()
    found = {p.parent for p in root.rglob("comparison.json")}
    found |= {p.parent.parent for p in root.rglob("summary.json") if p.parent.name == "analysis"}
    return sorted(p for p in found if _is_run(p))


def newest_run(root: str | Path = "outputs") -> Path:
    """The most recently finished run below `root` (by the time its last result file was written)."""
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(
            f"no moe-train run directory below {Path(root).resolve()}; "
            "train one with `moe-train`, or set the run directory explicitly"
        )

    def finished(p: Path) -> float:
        return max(f.stat().st_mtime for f in (p / "comparison.json", p / SUMMARY) if f.is_file())

    return max(runs, key=finished)


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"dotted.key": leaf}; lists stay leaves (as tuples, so they compare)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


_MISSING = object()


def varying_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Dotted config keys whose value is not the same in every config (missing counts as a value),
    in the order they first appear; `seed` last, since it is usually the replicate axis."""
    flat = [flatten_config(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    varying = [k for k in keys if len({repr(f.get(k, _MISSING)) for f in flat}) > 1]
    return sorted(varying, key=lambda k: k == "seed")


@dataclass(frozen=True)
class Sweep:
    """Runs found below a sweep directory and the config keys (`axes`) that tell them apart."""

    root: Path
    runs: list[Run]
    axes: list[str]

    def params(self, run: Run) -> dict[str, Any]:
        """{axis: value} of one run (None where its config lacks the key)."""
        flat = flatten_config(run.config)
        return {k: flat.get(k) for k in self.axes}

    def label(self, run: Run) -> str:
        """A short label, e.g. "scope=global_batch, seed=1" (the last key component where that is
        unambiguous); the directory name when no config key varies."""
        if not self.axes:
            return run.name
        short = [k.rsplit(".", 1)[-1] for k in self.axes]
        names = short if len(set(short)) == len(short) else self.axes
        return ", ".join(f"{n}={_fmt(v)}" for n, v in zip(names, self.params(run).values()))

    @property
    def main_axis(self) -> str | None:
        """The first axis that is not `seed` (what a comparison groups by), or None."""
        return next((k for k in self.axes if k != "seed"), None)

    def summaries(self) -> dict[str, dict[str, Any]]:
        """{label: summary} of the analyzed runs, in path order."""
        return {self.label(r): r.summary for r in self.runs if r.summary is not None}


def _fmt(value: Any) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)


def load_sweep(sweep_dir: str | Path) -> Sweep:
    """All run directories below `sweep_dir` (e.g. `multirun/<date>/<time>/`), analyzed or not."""
    root = Path(sweep_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {root} does not exist")
    runs = [load_run(p, need_summary=False) for p in find_runs(root)]
    if not runs:
        raise FileNotFoundError(f"no run directory (comparison.json or {SUMMARY}) below {root}")
    return Sweep(root=root, runs=runs, axes=varying_keys([r.config for r in runs]))


def _get(d: Mapping[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def loss_gap(comparison: Mapping[str, Any] | None, domain: str = "all") -> float:
    """The MoE's validation loss minus its active-matched dense twin's (`dense_active`), nats/token
    on `domain` ("all": every domain's validation tokens) of a comparison.json-shaped mapping
    ({model: {"val_loss": {domain: nats}}}); negative = the MoE is better. nan when either loss is
    missing (a run without an active twin has no gap: the total-matched twin is another question)."""
    return _nan(_get(comparison, "moe", "val_loss", domain)) - _nan(_get(comparison, ACTIVE_TWIN, "val_loss", domain))


def sweep_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One flat row per (run, MoE layer); a run without analysis gives one row with layer None.

    Keys: run, label, the sweep axes, layer, verdict (the layer's), model_verdict; for every measure
    of `analysis.registry.MEASURES` its columns name, name_low, name_high, name_p (nmi, cmi,
    nmi_top1, cmi_top1, mi_domain, mi_token, vocabulary, consecutive, maxvio, knockout, cka); nmi_plugin,
    nmi_null_q95, nmi_top1_plugin (the plug-in NMI counting each token's top-1 expert),
    docs_min (fewest validation documents of a domain), cmi_bits, dense_cv (median damage CV of the
    twin's unit groups), routing_use (I(D;E) over the probe's bits), committee_size (mean committee
    size); the run's path measures path_nmi, path_nmi_topk (and their _low/_high/_p) on each layer row;
    loss_moe, loss_dense (the active-matched twin), loss_gap = `loss_gap` (MoE minus the active twin,
    nats/token, all domains; negative = the MoE is better). Missing numbers are nan.
    """
    rows = []
    for run in sweep.runs:
        comp = run.comparison or {}
        base = {
            "run": run.name,
            "label": sweep.label(run),
            **sweep.params(run),
            "model_verdict": _get(run.summary, "verdict", "verdict"),
            "loss_moe": _nan(_get(comp, "moe", "val_loss", "all")),
            "loss_dense": _nan(_get(comp, ACTIVE_TWIN, "val_loss", "all")),
            "loss_gap": loss_gap(comp),
        }
        layers = (run.summary or {}).get("layers") or [None]
        paths = (run.summary or {}).get("paths") or {}
        for layer in layers:
            if layer is None:
                rows.append({**base, "layer": None, "verdict": None})
                continue
            m = layer["measures"]
            row = {**base, "layer": layer["layer"], "verdict": layer["verdict"]["verdict"]}
            for name in MEASURES:
                row.update(columns(name, m.get(name)))
            for mode, name in PATH_COLUMNS.items():  # the run's cross-layer measure, on each of its rows
                row.update(columns(name, paths.get(mode)))
            row.update(
                {
                    "nmi_plugin": _nan(m["nmi"].get("plugin")),
                    "nmi_null_q95": _nan(m["nmi"].get("null_q95")),
                    "nmi_top1_plugin": _nan((m.get("nmi_top1") or {}).get("plugin")),
                    "docs_min": min(m["nmi"].get("docs_per_domain") or [0]),
                    "cmi_bits": _nan(m["cmi"].get("bits")),
                    "dense_cv": _nan((m.get("knockout") or {}).get("dense_cv_median")),
                    "routing_use": _nan((m.get("probe_info") or {}).get("routing_use")),
                    "committee_size": _nan((m.get("committee_overlap") or {}).get("mean_size")),
                }
            )
            rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    """Rows (dicts, as `sweep_rows` gives) as a markdown table of the given columns (floats to
    `digits` significant digits, nan and missing as –), written by `moe.tables.markdown_table`."""

    def cell(x: Any) -> str:
        return _fmt(x) if isinstance(x, tuple) else format_number(x, digits)

    return _markdown_table(columns, [[r.get(c) for c in columns] for r in rows], fmt=cell)
