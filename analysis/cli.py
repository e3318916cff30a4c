"""`moe-analyze run_dir=PATH`: write the specialization report of a finished run.

    moe-analyze run_dir=outputs/2026-11-28/10-00-00
    moe-analyze run_dir=... analysis.n_permutations=1000 analysis.knockouts=false
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from analysis.report import AnalysisConfig
from analysis.run import analyze_run


@dataclass
class AnalyzeConfig:
    run_dir: str = MISSING  # a moe-train run directory
    model: str = "moe"
    twin: Optional[str] = "dense_active"  # dense control for knockouts; null = none
    batch_size: int = 16
    device: str = "cpu"
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


ConfigStore.instance().store(name="analyze_schema", node=AnalyzeConfig)


@hydra.main(version_base="1.3", config_path="pkg://moe.conf", config_name="analyze")
def main(dict_cfg: DictConfig) -> float:
    cfg: AnalyzeConfig = OmegaConf.to_object(dict_cfg)
    summary = analyze_run(cfg.run_dir, cfg.analysis, model=cfg.model, twin=cfg.twin,
                          batch_size=cfg.batch_size, device=cfg.device)
    print(f"report: {cfg.run_dir}/analysis/report.md  verdict: {summary['verdict']['verdict']}")
    return 0.0


if __name__ == "__main__":
    main()
