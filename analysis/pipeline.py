"""`moe-train`, the main job: train an MoE LM and its matched dense twins on one data stream,
compare them, then analyze the MoE into <run_dir>/analysis (`analyze=true`, the default).

    moe-train                                   # default experiment, built-in corpus, CPU
    moe-train -m balance=micro_batch,global_batch seed=0,1,2
    torchrun --nproc_per_node=2 -m analysis.pipeline trainer.device=cpu

The same Hydra app and configuration as `python -m moe.train` (which trains only); it lives here
because the analysis imports `moe` and `moe` never imports the analysis.
"""

from __future__ import annotations

from analysis.run import analyze_run
from moe.train import main as train_main


def main() -> None:
    """Train (moe.train's Hydra app), then analyze the run with moe-analyze's defaults."""
    train_main(after_training=analyze_run)


if __name__ == "__main__":
    main()
