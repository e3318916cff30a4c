"""Render the README's domain x expert heatmap from a run directory.

    python docs/make_readme_figure.py RUN_DIR [--out docs/figures/domain_expert_heatmap.png]

RUN_DIR is any analyzed `moe-train` run (it needs analysis/summary.json). Prints a caption that says
which run made the figure. The committed figure was made from

    moe-train data=builtin model=tiny trainer=smoke trainer.max_steps=60 analyze=true \\
        hydra.run.dir=/tmp/readme_run
    python docs/make_readme_figure.py /tmp/readme_run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.plots import plot_domain_expert_heatmaps
from analysis.runs import load_run

DEFAULT_OUT = Path(__file__).resolve().parent / "figures" / "domain_expert_heatmap.png"


def caption(run) -> str:
    """One sentence naming the run behind the figure: data, model size, steps, seed, verdict."""
    cfg, s = run.config, run.summary
    m = s["model"]
    return (
        f"Domain x expert routing of a {m['num_moe_layers']}-MoE-layer model (E = {m['num_experts']}, "
        f"k = {m['top_k']}, router {cfg.get('router', {}).get('kind')}, balance "
        f"{cfg.get('balance', {}).get('scope')}) trained {cfg.get('trainer', {}).get('max_steps')} steps "
        f"(seed {cfg.get('seed')}) on the {cfg.get('data', {}).get('source')} corpus "
        f"({', '.join(s['domains'])}); {s['tokens']['recorded']} validation tokens; "
        f"report verdict: {s['verdict']['verdict']}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="an analyzed moe-train run directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args()
    run = load_run(args.run_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_domain_expert_heatmaps(run.summary).savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}\n{caption(run)}")


if __name__ == "__main__":
    main()
