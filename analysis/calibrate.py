"""`moe-calibrate`: run the verdict and the other routing measures on routers whose truth is known
and write the calibration report.

    moe-calibrate                                      # built-in corpus, every battery, default routers
    moe-calibrate battery.replicates=20 battery.workers=2
    moe-calibrate parts=[committees,paths,probe]       # only these batteries (see `PARTS`)
    moe-calibrate data=local data.local.path=/corpus   # any data source's validation split
    moe-calibrate run_dir=outputs/2026-11-28/10-00-00  # the validation data of a training run
    moe-calibrate out_dir=docs                         # what made docs/calibration.md

The batteries (`parts`): routers (the combined verdict and its criteria, `battery.*`), committees
(standing-committee overlap over the same router draws), knockout (simulated damage), paths (two
drawn layers per replicate, `paths.*`) and probe (synthetic router inputs, `probe.*`).

Writes into `out_dir` (default: a fresh `outputs/calibrate/<date>/<time>`):

    calibration.md               the tables (rates per router and criterion with Wilson intervals),
                                 the targets met or not, the command and the commit each battery ran on
    figures/calibration_power.png  P(specialist) against the strength s and against the true NMI
                                 (written when the routers battery runs)
    calibration/rows.csv         one row per replicate of the routers battery (every number the verdict read)
    calibration/committee_rows.csv, path_rows.csv, probe_rows.csv   the same for the other batteries
    calibration/summary.json     the rates, the targets and the setup of each battery

A battery that does not run keeps what an earlier run wrote into the same `out_dir` (its part of
summary.json, its rows file, and its provenance line), so `parts=[...] out_dir=docs` refreshes
some sections of docs/calibration.md and leaves the others' numbers as they were.

No training: the routers are rules over the validation tokens (`analysis.calibration`).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from analysis.calibration import (
    COMMITTEE_COLUMNS,
    DOMAIN_AWARE,
    DOMAIN_BLIND,
    BatteryConfig,
    PathBatteryConfig,
    ProbeBatteryConfig,
    ValidationTokens,
    check_committee_targets,
    check_path_targets,
    check_probe_targets,
    check_targets,
    knockout_battery,
    run_battery,
    run_path_battery,
    run_probe_battery,
    summarize_battery,
    summarize_committees,
    summarize_path_battery,
    summarize_probe_battery,
)
from analysis.cli import register_app_configs
from analysis.verdict import ENSEMBLE, SPECIALIST
from moe.config import config_object
from moe.data import DataConfig
from moe.host_memory import retain_freed_memory
from moe.tables import format_number, markdown_table, write_json

__all__ = [
    "PARTS",
    "CalibrateConfig",
    "render_calibration",
    "run_calibration",
    "validation_tokens",
    "write_calibration",
]

# The batteries, in the order they run and appear in calibration.md.
PARTS = ("routers", "committees", "knockout", "paths", "probe")
# The files of each part under out_dir/calibration/ (routers and knockout share summary.json's top level).
_ROWS_FILE = {
    "routers": "rows.csv",
    "committees": "committee_rows.csv",
    "paths": "path_rows.csv",
    "probe": "probe_rows.csv",
}
_NEW_PARTS = ("committees", "paths", "probe")


@dataclass
class CalibrateConfig:
    # Validation data: a moe-train run directory (its data/), or else the `data` source prepared here.
    run_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0  # of the data's document split (as moe-train's seed)
    batch_size: int = 64
    # Where calibration.md goes; null = the Hydra run directory.
    out_dir: str | None = None
    # Which batteries run (`PARTS`); the others keep what an earlier run wrote into out_dir.
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    # A sentence added to this run's provenance line (e.g. what the working tree held beyond the commit).
    note: str | None = None
    # Keep freed CPU buffers for reuse (glibc; moe/host_memory.py), as moe-analyze does.
    retain_host_memory: bool = True
    # The routers battery; its experts, nulls, thresholds, seed and workers serve every battery.
    battery: BatteryConfig = field(default_factory=BatteryConfig)
    paths: PathBatteryConfig = field(default_factory=PathBatteryConfig)
    probe: ProbeBatteryConfig = field(default_factory=ProbeBatteryConfig)


def validation_tokens(cfg: CalibrateConfig) -> ValidationTokens:
    """The validation tokens of `cfg.run_dir`, or of `cfg.data` prepared with `cfg.seed`."""
    from moe.data import load_prepared, prepare_data

    data = load_prepared(cfg.run_dir) if cfg.run_dir else prepare_data(cfg.data, seed=cfg.seed)
    return ValidationTokens.from_batches(data.val_batches(batch_size=cfg.batch_size), data.domains)


def _commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _rate(entry: Mapping[str, Any], key: str) -> str:
    low, high = entry[f"{key}_ci"]
    return f"{entry[key]:.2f} [{low:.2f}, {high:.2f}]"


def _power_figure(summary: Sequence[Mapping[str, Any]], detection_limit: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, style in (("domain", "-"), ("domain_hash", "--")):
        for k in sorted({s["top_k"] for s in summary}):
            pts = sorted(
                (s["strength"], s["expected_nmi"], s[f"verdict_{SPECIALIST}"])
                for s in summary
                if s["kind"] == kind and s["top_k"] == k
            )
            if not pts:
                continue
            label = f"{kind}:s, top-{k}"
            left.plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", ms=4, label=label)
            if kind == "domain":
                right.plot([p[1] for p in pts], [p[2] for p in pts], style, marker="o", ms=4, label=label)
    for ax in (left, right):
        ax.axhline(0.8, color="grey", lw=0.8, ls=":")
        ax.axhline(0.05, color="red", lw=0.8, ls=":")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("P(verdict = specialist)")
        ax.legend(fontsize=7)
    left.set_xscale("symlog", linthresh=0.05)
    left.set_xlabel("strength s (share of tokens sent to their domain's experts)")
    right.axvline(detection_limit, color="grey", lw=0.8, ls="--")
    right.set_xlabel("true NMI (of the mean routing table)")
    right.set_xscale("log")
    fig.suptitle("Power of the combined verdict on domain-aware routers", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """One CSV row per replicate; the columns are every key met, in order of appearance."""
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def _merge(existing: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json after this run: the parts that ran replace theirs, the others stay as written.

    The routers battery owns the top-level setup, targets and routers; the knockout battery the
    knockout list, with its own knockout_setup only when it ran without the routers (otherwise the
    top-level setup is its provenance); committees, paths and probe are self-contained parts."""
    merged = dict(existing)
    if "routers" in new:
        if "knockout" in merged and "knockout" not in new and "knockout_setup" not in merged and "setup" in merged:
            merged["knockout_setup"] = merged["setup"]  # the old knockout keeps its own provenance
        for key in ("setup", "targets", "routers"):
            merged[key] = new[key]
    if "knockout" in new:
        merged["knockout"] = new["knockout"]
        merged.pop("knockout_setup", None)
        if "knockout_setup" in new:
            merged["knockout_setup"] = new["knockout_setup"]
    for part in _NEW_PARTS:
        if part in new:
            merged[part] = new[part]
    return merged


def write_calibration(
    out_dir: str | Path,
    summary: Mapping[str, Any],
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    merge: bool = True,
) -> Path:
    """Write calibration.md, calibration/summary.json, the rows files and (when the routers battery
    ran) figures/calibration_power.png into `out_dir`.

    summary: what `run_calibration` measured (the parts that ran); rows: {file name under
    calibration/: per-replicate rows}. merge: keep the parts of an existing calibration/summary.json
    in out_dir that did not run now (`_merge`), so that calibration.md shows every battery, each
    with the command and commit that made it. Returns the path of calibration.md."""
    out = Path(out_dir)
    data_dir = out / "calibration"
    data_dir.mkdir(parents=True, exist_ok=True)
    existing: dict[str, Any] = {}
    if merge and (data_dir / "summary.json").is_file():
        existing = json.loads((data_dir / "summary.json").read_text())
    merged = _merge(existing, summary)
    for name, part_rows in rows.items():
        if part_rows:
            _write_rows(data_dir / name, part_rows)
    write_json(data_dir / "summary.json", merged, indent=1)
    if "routers" in summary:
        _power_figure(
            summary["routers"],
            summary["setup"]["battery"]["detection_limit"],
            out / "figures" / "calibration_power.png",
        )
    (out / "calibration.md").write_text(render_calibration(merged))
    return out / "calibration.md"


def _command(setup: Mapping[str, Any]) -> str:
    """The command as run, without its note= override (the note is printed as a note)."""
    return re.sub(r""" note=('[^']*'|"[^"]*"|\S+)""", "", str(setup["command"]))


def _provenance(setup: Mapping[str, Any], seconds: bool = True) -> str:
    note = f"; {setup['note']}" if setup.get("note") else ""
    took = f"{setup['seconds']:.0f} s on " if seconds else ""
    return (
        f"`{_command(setup)}` on commit `{setup['commit']}` ({setup['date']}, {took}{setup['workers']} worker(s){note})"
    )


def _validation(setup: Mapping[str, Any]) -> str:
    return f"{setup['data']}; " + ", ".join(
        f"{d}: {c['tokens']} tokens in {c['documents']} documents" for d, c in setup["validation"].items()
    )


def _ci(value: float, ci: Sequence[float]) -> str:
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _met(ok: bool) -> str:
    return f"**{'met' if ok else 'not met'}**"


def render_calibration(summary: Mapping[str, Any]) -> str:
    """calibration.md from a summary.json's content: each battery present, with its provenance."""
    lines = [
        "# Calibration of the verdict on routers whose truth is known",
        "",
        "Every number below comes from `calibration/summary.json` and the per-replicate rows beside this file "
        "(`calibration/rows.csv`, `committee_rows.csv`, `path_rows.csv`, `probe_rows.csv`). Each battery was "
        "made by the command and on the commit named here:",
        "",
    ]
    made = []
    knockout = bool(summary.get("knockout"))
    if "routers" in summary:
        both = knockout and "knockout_setup" not in summary
        made.append(f"- routers (the verdict){' and knockouts' if both else ''}: {_provenance(summary['setup'])}")
    if knockout and ("knockout_setup" in summary or "routers" not in summary):
        made.append(f"- knockouts: {_provenance(summary.get('knockout_setup', summary.get('setup', {})))}")
    # The other batteries, one line per run that made them (with each battery's own time).
    runs: dict[str, list[str]] = {}
    for part in _NEW_PARTS:
        if part in summary:
            setup = summary[part]["setup"]
            label = f"{_LABELS[part]} ({setup['seconds']:.0f} s)"
            runs.setdefault(_provenance(setup, seconds=False), []).append(label)
    made += [f"- {', '.join(labels)}: {run}" for run, labels in runs.items()]
    lines += made
    if "routers" in summary:
        lines += _render_routers(summary["routers"], summary["targets"], summary["setup"])
    if summary.get("knockout"):
        lines += _render_knockout(summary["knockout"], summary.get("knockout_setup", summary.get("setup", {})))
    if "routers" in summary:
        lines += _ROUTERS_READING
    if "committees" in summary:
        lines += _render_committees(summary["committees"], summary.get("routers", []), summary.get("setup"))
    if "paths" in summary:
        lines += _render_paths(summary["paths"], summary.get("setup"))
    if "probe" in summary:
        lines += _render_probe(summary["probe"], summary.get("setup"))
    return "\n".join(lines) + "\n"


_LABELS = {"committees": "standing committees", "paths": "expert paths", "probe": "router-input probe"}


def _render_routers(
    summary: Sequence[Mapping[str, Any]], targets: Mapping[str, Any], setup: Mapping[str, Any]
) -> list[str]:
    b, t = setup["battery"], setup["battery"]["thresholds"]
    lines = [
        "",
        "## Setup",
        "",
        f"- validation data: {_validation(setup)}",
        f"- E = {b['num_experts']} experts, top-k in {b['top_k']}, {b['replicates']} replicates per router and k "
        "(each a fresh random draw of the rule: hash functions, document preferences, coin flips)",
        f"- each replicate is judged exactly as a trained layer: NMI above its document-permutation null "
        f"({b['n_permutations']} permutations) with a domain-stratified document bootstrap ({b['n_bootstrap']}), "
        f"and the held-out I(D;E|C), C = {b['context']}, with its domain-stratified document bootstrap",
        f"- thresholds: alpha = {t['alpha']}, NMI margin {t['nmi_margin']} (on NMI minus its null mean), "
        f"CMI margin {t['cmi_margin']} (share of H(D|C)); specialist = significant and the interval reaches the "
        "margin; ensemble = the interval lies below the margin; the layer is specialist only if both say so",
        "- rates are shares of replicates with a 95% Wilson interval",
        "",
        "## Targets",
        "",
    ]
    fs = targets["max_false_specialist_verdict"]
    lines.append(
        f"- false-specialist rate of the combined verdict on domain-blind routers, at most "
        f"{targets['alpha']}: worst {fs['rate']:.3f} ({fs['router']}, top-{fs['top_k']}) — "
        f"{_met(fs['rate'] <= targets['alpha'])}"
    )
    for c in ("nmi", "cmi"):
        w = targets[f"max_false_specialist_{c}"]
        lines.append(
            f"- criterion `{c}` alone on domain-blind routers: worst {w['rate']:.3f} ({w['router']}, top-{w['top_k']})"
        )
    power = targets["power"]
    lines.append(
        f"- power at a true NMI of {targets['power_at_nmi']}, at least 0.8: "
        + ", ".join(f"top-{k}: {'n/a' if p is None else f'{p:.2f}'}" for k, p in power.items())
        + f" — {_met(targets['met']['power'])}"
    )
    fe = targets["max_false_ensemble_above_limit"]
    lines.append(
        "- ensemble never called on a domain-aware router at or above that NMI: "
        + (
            "no such router"
            if fe is None
            else f"worst {fe['rate']:.3f} ({fe['router']}, top-{fe['top_k']}) — {_met(fe['rate'] == 0)}"
        )
    )
    lines.append("")
    lines.append(
        "The NMI criterion alone is *expected* to call token-keyed routers specialist when domains differ "
        "in vocabulary: their routing really carries domain information (through the tokens). That is "
        "why it cannot decide alone and the held-out I(D;E|C) must agree."
    )
    header = [
        "router",
        "k",
        "truth",
        "NMI of the mean table",
        "NMI−null (mean)",
        "NMI null q95 (mean)",
        "CMI share (mean)",
        "nmi: specialist",
        "cmi: specialist",
        "verdict: specialist",
        "verdict: ensemble",
    ]
    for truth, title in (
        (DOMAIN_BLIND, "Domain-blind routers (truth: not specialist)"),
        (DOMAIN_AWARE, "Domain-aware routers (truth: specialist)"),
    ):
        sel = [s for s in summary if s["truth"] == truth]
        if not sel:
            continue
        lines += ["", f"## {title}", ""]
        lines.append(
            markdown_table(
                header,
                [
                    [
                        s["router"],
                        s["top_k"],
                        s["truth"],
                        f"{s['expected_nmi']:.3f}",
                        f"{s['nmi_excess_mean']:+.3f}",
                        f"{s['nmi_null_q95_mean']:.3f}",
                        f"{s['cmi_share_mean']:+.3f}",
                        _rate(s, f"nmi_{SPECIALIST}"),
                        _rate(s, f"cmi_{SPECIALIST}"),
                        _rate(s, f"verdict_{SPECIALIST}"),
                        _rate(s, f"verdict_{ENSEMBLE}"),
                    ]
                    for s in sel
                ],
                fmt=format_number,
            )
        )
    return lines


def _render_knockout(knockout: Sequence[Mapping[str, Any]], setup: Mapping[str, Any]) -> list[str]:
    lines = [
        "",
        "## The knockout criterion on simulated damage",
        "",
        f"Each layer: {setup['battery']['num_experts']} experts whose knockouts hurt every domain alike "
        "(truth: not specialist) or one domain only, judged against 24 dense unit groups hurting every domain "
        "alike at damages spread over [m/2, 2m]; 4 domains x 4,096 tokens, dense per-token sd 0.3. The old "
        "selectivity (max − mean)/mean/(D − 1) of equal-damage experts climbs as the damage shrinks; the "
        "noise-corrected CV does not. The criterion is one-sided (it never calls an ensemble) and does not "
        "vote.",
        "",
    ]
    lines.append(
        markdown_table(
            [
                "mean damage (nats)",
                "experts' per-token sd",
                "experts hurt",
                "replicates",
                "knockout: specialist",
                "old selectivity (median)",
                "corrected CV (median)",
            ],
            [
                [
                    r["mean_damage"],
                    r["expert_sd"],
                    "every domain" if r["profile"] == "equal" else "one domain",
                    r["replicates"],
                    _ci(r["specialist"], r["specialist_ci"]),
                    f"{r['old_selectivity_median']:.3f}",
                    f"{r['cv_median']:.3f}",
                ]
                for r in knockout
            ],
            fmt=format_number,
        )
    )
    return lines


_ROUTERS_READING = [
    "",
    "## Power",
    "",
    "![power](figures/calibration_power.png)",
    "",
    "Left: P(specialist) against the share s of tokens sent to their domain's own experts (the rest "
    "random, or hashed by token). Right: the same against the true NMI (of the mean routing table over "
    "the replicates). Dotted lines: 0.8 and alpha.",
    "",
    "## How to read it",
    "",
    "- `doc:a` routers prefer experts per document, independent of its domain: the document clustering "
    "that fooled the old within-token null. Their NMI null q95 spans the range seen in trained runs.",
    "- `doc_length` and `doc_position` route by a document property whose distribution differs between "
    "domains (document length), so each drawn router really carries domain information beyond the token; "
    "no routing statistic can tell that apart from domain routing without conditioning on the property. "
    "A causal LM router cannot see a whole document's length, but it can see the position inside it.",
    "- NMI of the mean table: the NMI of the domain x expert table averaged over the replicates, the true NMI "
    "of a domain-aware router (its expectation); for keyed routers each replicate's key-to-expert map "
    "differs, so it averages to ~0 although every replicate routes with a fixed map.",
    "- The held-out CMI of domain-blind routers is negative on average: fitted on some documents, the "
    "domain offsets only carry those documents' quirks to the held-out ones. It is a conservative "
    "estimate; its power comes from the domain-aware rows.",
]


def _part_header(title: str, part: Mapping[str, Any], routers_setup: Mapping[str, Any] | None) -> list[str]:
    """A part's heading, its provenance and validation data, and a warning when the latter differ
    from the routers battery's (its numbers then come from other tokens)."""
    setup = part["setup"]
    lines = [
        "",
        f"## {title}",
        "",
        f"- made by `{_command(setup)}` on commit `{setup['commit']}` (the run listed at the top; "
        f"{setup['seconds']:.0f} s on {setup['workers']} worker(s))",
        f"- validation data: {_validation(setup)}",
    ]
    if routers_setup is not None and routers_setup.get("validation") != setup.get("validation"):
        lines.append(
            "- these validation tokens differ from the routers battery's (see its Setup): the data preparation "
            "changed between the two runs, so the batteries' replicates are not the same draws"
        )
    return lines


def _render_committees(
    part: Mapping[str, Any], routers: Sequence[Mapping[str, Any]], routers_setup: Mapping[str, Any] | None
) -> list[str]:
    b = part["setup"]["battery"]
    targets, cells = part["targets"], part["cells"]
    lines = _part_header("Standing committees (`analysis.committees`)", part, routers_setup)
    lines += [
        f"- the routers battery's rules, E = {b['num_experts']}, top-k in {b['top_k']}, {b['replicates']} "
        "replicates per router and k; in each, `committee_evidence` on the replicate's document table: per "
        f"domain the smallest expert set carrying {b['committee_mass']} of its routing mass, their mean "
        f"pairwise Jaccard overlap across domains against its document-permutation null ({b['n_permutations']} "
        "permutations)",
        f"- committee call **disjoint** = overlap significantly below its document null (p < "
        f"{targets['alpha']}); its rate on domain-blind routers is the false-disjoint rate, on domain-aware "
        "ones its power (against the true NMI, that of the mean table)",
        "",
    ]
    fd = targets["max_false_disjoint"]
    if fd is not None:
        lines.append(
            f"- false-disjoint rate on domain-blind routers, at most {targets['alpha']}: worst {fd['rate']:.3f} "
            f"({fd['router']}, top-{fd['top_k']}) — {_met(targets['met']['false_disjoint'])}"
        )
        over = targets.get("false_disjoint_above_alpha") or []
        if over:
            lines.append("- above alpha: " + ", ".join(f"{w['router']} top-{w['top_k']} {w['rate']:.2f}" for w in over))
    lines.append(
        f"- power at a true NMI of {targets['power_at_nmi']}, at least 0.8: "
        + ", ".join(f"top-{k}: {'n/a' if p is None else f'{p:.2f}'}" for k, p in targets["power"].items())
        + f" — {_met(targets['met']['power'])}"
    )
    by_cell = {(s["router"], s["top_k"]): s for s in routers}
    header = [
        "router",
        "k",
        "truth",
        "NMI of the mean table",
        "overlap (mean)",
        "null mean (mean)",
        "committee size (mean)",
        "null size (mean)",
        "p (median)",
        "committees: disjoint",
        "nmi: specialist*",
        "verdict: specialist*",
    ]
    for truth, title in ((DOMAIN_BLIND, "domain-blind routers"), (DOMAIN_AWARE, "domain-aware routers")):
        sel = [s for s in cells if s["truth"] == truth]
        if not sel:
            continue
        lines += ["", f"### Committees on {title}", ""]
        rows = []
        for s in sel:
            r = by_cell.get((s["router"], s["top_k"]))
            rows.append(
                [
                    s["router"],
                    s["top_k"],
                    s["truth"],
                    f"{s['expected_nmi']:.3f}",
                    f"{s['overlap_mean']:.3f}",
                    f"{s['null_mean_mean']:.3f}",
                    f"{s['size_mean']:.2f}",
                    f"{s['null_size_mean']:.2f}",
                    f"{s['p_median']:.3f}",
                    _ci(s["committee_disjoint"], s["committee_disjoint_ci"]),
                    "—" if r is None else _rate(r, f"nmi_{SPECIALIST}"),
                    "—" if r is None else _rate(r, f"verdict_{SPECIALIST}"),
                ]
            )
        lines.append(markdown_table(header, rows, fmt=format_number))
    lines += [
        "",
        "\\* from the routers battery above (its own replicates, on its own validation tokens).",
        "",
        "How to read it:",
        "",
        "- The committee call has no margin and no context: it asks whether the domains' half-mass committees "
        "differ more than the same documents' committees do under shuffled domain labels. Any domain "
        "information in routing makes them differ, including what the tokens carry: a token-keyed router "
        "(hash, bigram) over domains with different vocabularies, or one keyed on a document property whose "
        "distribution differs between domains (doc_length), has committees that differ by domain. Its "
        "false-disjoint rate is the share of such routers it calls disjoint; read it like the `nmi` criterion "
        "alone, which needs the held-out I(D;E|C) to separate vocabulary from domain.",
        "- The other face of having no margin: it calls domain-aware routers disjoint far below the verdict's "
        "detection limit (domain:0.05 and domain:0.1, true NMI 0.003-0.01, in most replicates). Disjoint "
        "committees say that routing carries *some* domain information, not that the layer is a specialist; "
        "they do not stand in for the verdict.",
        "- Committees are coarse: with flat routing a half-mass committee holds about half the experts, chosen "
        "by noise, and overlaps of a few small sets take few values; read the overlap against its null mean, "
        "never against 0 or 1.",
    ]
    return lines


def _render_paths(part: Mapping[str, Any], routers_setup: Mapping[str, Any] | None) -> list[str]:
    setup = part["setup"]
    b, pc, t = setup["battery"], setup["paths"], setup["battery"]["thresholds"]
    targets, cells = part["targets"], part["cells"]
    lines = _part_header("Expert paths across two layers (`analysis.paths`)", part, routers_setup)
    lines += [
        f"- two top-1 layers of E = {b['num_experts']} experts per replicate ({b['num_experts'] ** 2} possible "
        f"paths), {pc['replicates']} replicates of each of {len(pc['routers'])} rules (top-1 only, and fewer rules "
        "than the routers battery, to fit the time budget): each layer drawn from the same rule with its own "
        "randomness (its own hash "
        "functions, document preferences and coin flips), or the planted pair `xor:s`: layer 1 uniform, layer "
        "2 = layer 1 + domain (mod E) with probability s, else uniform, so that each layer alone is exactly "
        "domain-blind and the pair codes the domain",
        f"- `path_information` (mode top1): path NMI against its document-permutation null ({b['n_permutations']} "
        f"permutations, bootstrap {b['n_bootstrap']}) and the held-out I(D;path|C), C = {b['context']}, as a "
        "share of H(D|C); each layer's own NMI beside it",
        f"- path call = the layer verdict's rule on the path: specialist when the path NMI − null is "
        f"significant with its interval reaching {t['nmi_margin']} **and** the held-out path share is "
        f"significant with its interval reaching {t['cmi_margin']}; ensemble when the held-out share's interval "
        "lies below its margin (or the NMI's below its margin without the share saying specialist)",
        "",
    ]
    fs = targets["max_false_specialist"]
    if fs is not None:
        lines.append(
            f"- false-specialist rate of the path call on domain-blind rules, at most {targets['alpha']}: worst "
            f"{fs['rate']:.3f} ({fs['router']}) — {_met(targets['met']['false_specialist'])}"
        )
    power = targets["power"]
    lines.append(
        f"- power at a true path NMI of {targets['power_at_nmi']} along domain:s, at least 0.8: "
        f"{'n/a' if power is None else f'{power:.2f}'} — {_met(targets['met']['power'])}"
    )
    if targets.get("xor"):
        lines.append(
            "- the planted pair (each layer domain-blind): "
            + ", ".join(f"{name}: {rate:.2f}" for name, rate in targets["xor"].items())
        )
    header = [
        "rule",
        "truth",
        "true path NMI",
        "true layer NMI",
        "paths (mean)",
        "path NMI−null (mean)",
        "larger layer NMI−null (mean)",
        "held-out path share (mean)",
        "path nmi: specialist",
        "path cmi: specialist",
        "path: specialist",
        "path: ensemble",
        "a layer's nmi: specialist",
    ]
    lines += [
        "",
        markdown_table(
            header,
            [
                [
                    s["router"],
                    s["truth"],
                    f"{s['expected_path_nmi']:.3f}",
                    f"{s['expected_layer_nmi']:.3f}",
                    f"{s['n_paths_mean']:.1f}",
                    f"{s['path_nmi_excess_mean']:+.3f}",
                    f"{s['layer_nmi_excess_max_mean']:+.3f}",
                    f"{s['heldout_share_mean']:+.3f}",
                    _rate(s, f"nmi_{SPECIALIST}"),
                    _rate(s, f"cmi_{SPECIALIST}"),
                    _rate(s, f"verdict_{SPECIALIST}"),
                    _rate(s, f"verdict_{ENSEMBLE}"),
                    _rate(s, "layer_nmi_specialist"),
                ]
                for s in cells
            ],
            fmt=format_number,
        ),
        "",
        "How to read it:",
        "",
        "- true path NMI / true layer NMI: of the domain x path (x expert) table averaged over the replicates; "
        "for keyed rules each replicate's map differs, so they average to ~0 as in the routers battery.",
        "- Two independently keyed layers give up to E² paths, a finer key than one layer: the path NMI − null "
        "of token- or document-keyed rules runs above a single layer's, which is why the held-out share, "
        "conditioned on the token, must agree before a path is called specialist (for hash and doc_length it "
        "does not).",
        "- bigram: both layers keyed on the previous token. The held-out share conditions on the current token "
        "only (C = token), so what the previous token says about the domain counts as domain information "
        "beyond the context: one such layer (8 buckets of the previous token) stays below the CMI margin in the "
        "routers battery, a path of two (up to 64 buckets) carries more of it and crosses the margin. This is "
        "a limit of the context, not of the path estimator: with C = token and previous token "
        "(`battery.context=bigram`) the bigram path was called ensemble in a side check of 20 replicates (not "
        "in summary.json), at lower power. Trained routers see previous tokens through attention, so read a "
        "path call with C = token as 'domain information beyond the current token'.",
        "- `xor:s`: neither layer alone carries the domain (their NMI criteria should not call specialist), "
        "the pair does; a path measure must find it.",
        "- Keyed on documents (doc:1, doc_length) the held-out path share lies far below 0: few paths per "
        "document, and the domain offsets fitted on some documents' paths carry only those documents' quirks "
        "to the held-out ones (as for single layers, more so).",
    ]
    return lines


def _render_probe(part: Mapping[str, Any], routers_setup: Mapping[str, Any] | None) -> list[str]:
    setup = part["setup"]
    pc = setup["probe"]
    targets, cells = part["targets"], part["cells"]
    lines = _part_header("Domain information in the router's input (`analysis.probe_information`)", part, routers_setup)
    lines += [
        f"- synthetic router inputs x [N, {pc['dim']}] (float32) over the validation tokens' documents and "
        f"domains, {pc['replicates']} replicates per case: `noise` x ~ N(0, I); `doc:t` noise plus a "
        "per-document offset ~ N(0, t² I) independent of the document's domain (domain-blind document quirks); "
        "`domain:s` noise plus a domain mean ~ N(0, s² I) drawn per replicate; `domain_doc:s` both, document "
        "offsets of sd 1",
        f"- `probe_domain_information`: {pc['n_folds']} folds by document, stratified by domain, default ridge, "
        f"{pc['n_bootstrap']} document-bootstrap replicates; claim = positive information when p < "
        f"{targets['alpha']}",
        "- true bits: I(D;X) per token of the Gaussian mixture that generated x (0 for noise and document "
        "offsets; for domain shifts the Bayes posterior's cross-entropy gain over H(D) on the replicate's "
        "tokens, with the document offsets' variance in the per-token covariance)",
        "",
    ]
    fp = targets["max_false_positive"]
    if fp is not None:
        lines.append(
            f"- false-positive rate on domain-blind inputs, at most {targets['alpha']}: worst {fp['rate']:.3f} "
            f"({fp['case']}) — {_met(targets['met']['false_positive'])}"
        )
    limit = targets["power_80_at_bits"]
    lines.append(
        "- power reaches 0.8 along domain:s at a true information of "
        + ("(not reached)" if limit is None else f"about {limit:.4f} bits per token")
    )
    header = [
        "case",
        "truth",
        "true bits (mean)",
        "probe bits (mean)",
        "probe bits (sd)",
        "probe − truth (mean)",
        "fits converged",
        "positive (p < alpha)",
    ]
    lines += [
        "",
        markdown_table(
            header,
            [
                [
                    s["case"],
                    s["truth"],
                    f"{s['truth_bits_mean']:.4f}",
                    f"{s['bits_mean']:+.4f}",
                    f"{s['bits_sd']:.4f}",
                    f"{s['error_mean']:+.4f}",
                    f"{s['converged']:.2f}",
                    _ci(s["positive"], s["positive_ci"]),
                ]
                for s in cells
            ],
            fmt=format_number,
        ),
        "",
        "How to read it:",
        "",
        "- The probe bits are a held-out lower bound on I(D;X): below the truth by the probe's misfit on finite "
        "data, and below 0 when x carries nothing the held-out documents share (noise, document quirks).",
        "- Document offsets are what a probe scored on held-out *tokens* of its training documents would call "
        "the domain; with documents held out they carry nothing, and the estimate falls further below 0 the "
        "larger they are.",
        "- On noise and on pure domain shifts the probe runs below the truth by about the same amount (compare "
        "the noise row's mean with the domain:s rows' probe − truth): the price of fitting D x G weights on "
        "some folds and scoring another. It sets the detection limit: the truth must clear it.",
        "- `domain_doc:s`, the domain under document offsets (sd 1): the probe falls far below the truth and "
        "keeps no power until the shift is large. Its ridge (l2 = D on the loss summed over tokens) is sized "
        "for independent tokens, while the offsets make the documents (here ~140 in the training folds) the "
        "units of evidence: the fit follows the training documents' offsets and pays for them on the held-out "
        "ones. Hidden states of trained models carry strong document structure: read low or negative probe "
        "bits there as a loose lower bound, not as an input without domain information, and routing_use = "
        "I(D;E) / probe bits as possibly too high.",
    ]
    return lines


def _committee_split(rows: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The routers battery's rows without and with only the committee columns (plus the keys)."""
    keys = ("router", "kind", "strength", "truth", "top_k", "replicate", "nmi_plugin")
    verdict = [{k: v for k, v in r.items() if k not in COMMITTEE_COLUMNS} for r in rows]
    committees = [{**{k: r[k] for k in keys if k in r}, **{k: r[k] for k in COMMITTEE_COLUMNS if k in r}} for r in rows]
    return verdict, committees


def _check_parts(parts: Sequence[str]) -> None:
    if not parts or any(p not in PARTS for p in parts):
        raise ValueError(f"parts={list(parts)}: choose one or more of {list(PARTS)}")


def run_calibration(
    cfg: CalibrateConfig, tokens: ValidationTokens, command: str, progress: bool = True
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Run the batteries of `cfg.parts` on `tokens`: (summary, rows) for `write_calibration`.

    summary holds, for the routers battery, setup/targets/routers (the top level of summary.json);
    for the knockouts, knockout (and knockout_setup when the routers did not run); for committees,
    paths and probe, {setup, targets, cells}. Every setup names the command, commit, note, date,
    seconds, workers, data and validation tokens, and the configs it ran with."""
    _check_parts(cfg.parts)
    b = cfg.battery
    base = {
        "command": command,
        "commit": _commit(),
        "note": cfg.note,
        "date": time.strftime("%Y-%m-%d"),
        "workers": b.workers,
        "data": f"run {cfg.run_dir}" if cfg.run_dir else f"data={cfg.data.source} (seed {cfg.seed})",
        "validation": tokens.counts(),
        "battery": asdict(b),
    }
    summary: dict[str, Any] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    verdict, committees = "routers" in cfg.parts, "committees" in cfg.parts
    if verdict or committees:
        start = time.time()
        battery_rows, expected = run_battery(tokens, b, progress, verdict=verdict, committees=committees)
        seconds = time.time() - start
        verdict_rows, committee_rows = _committee_split(battery_rows)
        if verdict:
            cells = summarize_battery(verdict_rows, expected, b.confidence)
            summary["setup"] = {**base, "seconds": seconds, "with_committees": committees}
            summary["targets"] = check_targets(cells, b.thresholds, b.detection_limit)
            summary["routers"] = cells
            rows[_ROWS_FILE["routers"]] = verdict_rows
        if committees:
            cells = summarize_committees(committee_rows, expected, b.confidence)
            summary["committees"] = {
                "setup": {**base, "seconds": seconds, "with_routers": verdict},
                "targets": check_committee_targets(cells, b.thresholds.alpha, b.detection_limit),
                "cells": cells,
            }
            rows[_ROWS_FILE["committees"]] = committee_rows
    if "knockout" in cfg.parts and b.knockout_replicates > 0:
        start = time.time()
        summary["knockout"] = knockout_battery(b.knockout_replicates, thresholds=b.thresholds, seed=b.seed)
        if verdict:
            summary["setup"]["seconds"] += time.time() - start
        else:
            summary["knockout_setup"] = {**base, "seconds": time.time() - start}
    if "paths" in cfg.parts:
        start = time.time()
        path_rows, path_expected = run_path_battery(tokens, cfg.paths, b, progress)
        cells = summarize_path_battery(path_rows, path_expected, b.confidence)
        summary["paths"] = {
            "setup": {**base, "seconds": time.time() - start, "paths": asdict(cfg.paths)},
            "targets": check_path_targets(cells, b.thresholds.alpha, cfg.paths.detection_limit),
            "cells": cells,
        }
        rows[_ROWS_FILE["paths"]] = path_rows
    if "probe" in cfg.parts:
        start = time.time()
        probe_rows = run_probe_battery(tokens, cfg.probe, b, progress)
        cells = summarize_probe_battery(probe_rows, b.confidence)
        summary["probe"] = {
            "setup": {**base, "seconds": time.time() - start, "probe": asdict(cfg.probe)},
            "targets": check_probe_targets(cells, b.thresholds.alpha),
            "cells": cells,
        }
        rows[_ROWS_FILE["probe"]] = probe_rows
    return summary, rows


register_app_configs("calibrate", CalibrateConfig)


@hydra.main(version_base="1.3", config_path=None, config_name="calibrate")
def main(dict_cfg: DictConfig) -> float:
    cfg = config_object(CalibrateConfig, dict_cfg)
    _check_parts(cfg.parts)  # before the data is prepared
    if cfg.retain_host_memory:
        retain_freed_memory()
    out_dir = cfg.out_dir or HydraConfig.get().runtime.output_dir
    tokens = validation_tokens(cfg)
    summary, rows = run_calibration(cfg, tokens, "moe-calibrate " + " ".join(sys.argv[1:]))
    path = write_calibration(out_dir, summary, rows)
    met: dict[str, Any] = {p: summary[p]["targets"]["met"] for p in _NEW_PARTS if p in summary}
    if "routers" in summary:
        met = {"routers": summary["targets"]["met"], **met}
    print(f"calibration: {path}  targets met: {met}")
    return float(summary["targets"]["max_false_specialist_verdict"]["rate"]) if "routers" in summary else float("nan")


if __name__ == "__main__":
    main()
