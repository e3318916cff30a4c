"""`moe-analyze`: write the specialization report of a finished run, or of a pretrained MoE model
from Hugging Face.

    moe-analyze run_dir=outputs/2026-11-28/10-00-00
    moe-analyze run_dir=... analysis.n_permutations=1000 analysis.knockouts=false
    moe-analyze model=hf:allenai/OLMoE-1B-7B-0924 data=hf device=cuda out_dir=outputs/olmoe

With `model=hf:<Hub name or local directory>` the model is loaded with `transformers` (bf16 on
CUDA, float32 on CPU unless `dtype` says otherwise) and evaluated on the validation split of the
`data` group, tokenized with the model's own tokenizer; the report goes to `out_dir` (default: a
fresh `outputs/analyze/<date>/<time>`). Otherwise `model` names a model of the run in `run_dir`.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from analysis.report import AnalysisConfig
from analysis.run import analyze_run
from moe.config import config_object, reject_unknown_keys
from moe.data import DataConfig
from moe.host_memory import retain_freed_memory

HF_PREFIX = "hf:"
_NEEDS_RUN_DIR = (
    "moe-analyze needs run_dir=PATH (a moe-train run directory), or model=hf:<name> for a pretrained Hugging Face model"
)


@dataclass
class AnalyzeConfig:
    run_dir: str | None = None  # a moe-train run directory (required unless model=hf:...)
    # A model of the run (moe, dense_active, ...), or hf:<Hub name or local path> for a pretrained one.
    model: str = "moe"
    twin: str | None = "dense_active"  # dense control for knockouts; null = none (run_dir only)
    # A run that trained the twins without the MoE (twin.only=true, as a sweep's `dense` arm does);
    # null = the twin comes from run_dir.
    twin_run: str | None = None
    batch_size: int = 16
    device: str = "cpu"
    # Where the report goes; null = <run_dir>/analysis, or for model=hf:... the Hydra run directory.
    out_dir: str | None = None
    # model=hf:... only. The domain-labelled text (its tokenizer becomes the model's; tokens per domain:
    # data.val_tokens_per_domain), the seed of its document split, the weights' dtype (auto = bfloat16
    # on CUDA, float32 on CPU; float32 | bfloat16 | float16) and an optional Hub revision.
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    dtype: str = "auto"
    revision: str | None = None
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    # Keep freed CPU buffers for reuse (glibc; moe/host_memory.py), as training does: the statistics
    # allocate record-sized temporaries again and again, each paying its page faults afresh
    # otherwise (README, Benchmarks: bench_analysis.py with and without it).
    retain_host_memory: bool = True


def check_run_dir(run_dir: str) -> None:
    """ValueError unless `run_dir` is a moe-train run directory (it has the data/ the analysis reads)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(
            f"run_dir={run_dir} does not exist (or is not a directory); pass the directory moe-train "
            "wrote (hydra.run.dir of the training run)"
        )
    if not (path / "data" / "manifest.json").is_file():
        raise ValueError(
            f"run_dir={run_dir} is not a moe-train run directory (it has no data/manifest.json); pass the "
            "directory moe-train wrote (it holds config.yaml, data/ and models/)"
        )


def analyze_dir(model: str, run_dir: str | None, out_dir: str | None, fallback: str) -> str:
    """The Hydra run directory of moe-analyze: out_dir, else <run_dir>/analysis, else (model=hf:...)
    `fallback`. A missing or wrong run_dir, or a local model=hf: directory that is not a model, fails
    here, before Hydra creates any directory."""
    if str(model).startswith(HF_PREFIX):
        from analysis.hf.run import check_local_model_dir

        check_local_model_dir(str(model)[len(HF_PREFIX) :])
    elif not run_dir:
        raise ValueError(_NEEDS_RUN_DIR)
    else:
        check_run_dir(run_dir)
    if out_dir:
        return str(out_dir)
    if run_dir:
        return f"{run_dir}/analysis"
    return fallback


def register_app_configs(name: str, schema: type) -> None:
    """Store an app's configs in Hydra's ConfigStore: its schema (`<name>_schema`), conf/<name>.yaml
    and the conf/data/ group, all read from the installed package.

    Not `config_path="pkg://moe.conf"`: there `model` is a config group (moe-train's), so Hydra takes
    `model=hf:...` for a choice of that group and refuses it. A search path without conf/ keeps
    `model` a plain value; the YAML files stay the only copy of their content.
    """
    store = ConfigStore.instance()
    store.store(name=f"{name}_schema", node=schema)
    conf = importlib.resources.files("moe.conf")
    store.store(name=name, node=OmegaConf.create(conf.joinpath(f"{name}.yaml").read_text()))
    for option in sorted(conf.joinpath("data").iterdir(), key=lambda p: p.name):
        if option.name.endswith(".yaml"):
            store.store(group="data", name=option.name[: -len(".yaml")], node=OmegaConf.create(option.read_text()))


register_app_configs("analyze", AnalyzeConfig)
OmegaConf.register_new_resolver("moe_analyze_dir", analyze_dir, replace=True)


def _created_by_hydra(directory: Path) -> bool:
    """Whether `directory` holds nothing but the empty log file Hydra opens: created for this job."""
    return directory.is_dir() and all(
        p.is_file() and p.suffix == ".log" and p.stat().st_size == 0 for p in directory.iterdir()
    )


@hydra.main(version_base="1.3", config_path=None, config_name="analyze")
def main(dict_cfg: DictConfig) -> float:
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    fresh = _created_by_hydra(hydra_dir)
    try:
        return _analyze(dict_cfg)
    except BaseException:
        # A failing moe-analyze leaves nothing behind: remove the directory Hydra made for it (and
        # the empty log in it) unless the analysis wrote something there.
        if fresh and _created_by_hydra(hydra_dir):
            for p in hydra_dir.iterdir():
                p.unlink()
            hydra_dir.rmdir()
        raise


def _analyze(dict_cfg: DictConfig) -> float:
    reject_unknown_keys(dict_cfg, AnalyzeConfig)
    cfg = config_object(AnalyzeConfig, dict_cfg)
    if cfg.retain_host_memory:
        retain_freed_memory()
    if cfg.model.startswith(HF_PREFIX):
        from analysis.hf.run import analyze_hf_model

        out_dir = cfg.out_dir or HydraConfig.get().runtime.output_dir
        summary = analyze_hf_model(
            cfg.model[len(HF_PREFIX) :],
            cfg.data,
            out_dir,
            cfg.analysis,
            batch_size=cfg.batch_size,
            device=cfg.device,
            dtype=cfg.dtype,
            seed=cfg.seed,
            revision=cfg.revision,
        )
    else:
        if cfg.run_dir is None:
            raise ValueError(_NEEDS_RUN_DIR)
        out_dir = cfg.out_dir or f"{cfg.run_dir}/analysis"
        summary = analyze_run(
            cfg.run_dir,
            cfg.analysis,
            model=cfg.model,
            twin=cfg.twin,
            twin_run=cfg.twin_run,
            batch_size=cfg.batch_size,
            device=cfg.device,
            out_dir=out_dir,
        )
    print(f"report: {out_dir}/report.md  verdict: {summary['verdict']['verdict']}")
    return 0.0


if __name__ == "__main__":
    main()
