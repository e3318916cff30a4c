"""The held-out path share of the seed-0 sweep jobs with C = (token, previous token).

The calibration (docs/calibration.md) shows that previous-token routing fools the held-out path
share at C = token; `analysis.context=bigram` removes that. This script recomputes only the path
measure from each job's saved routing records (`analysis/routing.npz`) with context="bigram", and
prints it beside the C = token numbers in the job's summary.json. Usage:

    python docs/sweep/new_measures/paths_bigram.py /path/to/sweep > paths_bigram.md
"""

import json
import sys
from pathlib import Path

import numpy as np

from analysis.paths import PATH_MEASURES, path_information
from analysis.records import RoutingRecords
from analysis.report import AnalysisConfig


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def main(root: Path) -> None:
    cfg = AnalysisConfig()
    print("| job | path | path NMI − null | held-out share, C = token | held-out share, C = bigram [CI] | p |")
    print("|---|---|---|---|---|---|")
    for job in sorted(p for p in root.iterdir() if (p / "analysis" / "routing.npz").exists()):
        summary = json.loads((job / "analysis" / "summary.json").read_text())
        records = RoutingRecords.load(job / "analysis" / "routing.npz")
        name = ",".join(kv for kv in job.name.split(",") if kv.split("=")[0] in ("arm", "data"))
        for mode, rng in zip(PATH_MEASURES, np.random.default_rng(cfg.seed).spawn(len(PATH_MEASURES))):
            token = summary["paths"][mode]
            info = path_information(
                records,
                len(records.domains),
                mode=mode,
                n_permutations=cfg.n_permutations,
                n_bootstrap=cfg.n_bootstrap,
                confidence=cfg.confidence,
                context="bigram",
                per_layer=False,
                rng=rng,
            ).as_measure_result()
            d = info.details
            print(
                f"| {name} | {mode} | {fmt(token['value'])} | {fmt(token['heldout_share'])} "
                f"| {fmt(d['heldout_share'])} [{fmt(d['heldout_ci_low'])}, {fmt(d['heldout_ci_high'])}] "
                f"| {fmt(d['heldout_p'], '.3g')} |",
                flush=True,
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
