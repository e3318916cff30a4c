"""`moe-train`: train an MoE LM and its matched dense twins on one data stream, then compare them.

    moe-train                                   # default experiment, built-in corpus, CPU
    moe-train -m balance=micro_batch,global_batch seed=0,1,2
    torchrun --nproc_per_node=2 -m moe.train trainer.device=cpu

Everything lands in the Hydra run directory: config.yaml, data/ (manifest, tokenizer),
models/<name>/ (checkpoints, metrics.jsonl, tensorboard/), comparison.json/.md, analysis/.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moe.checkpoint import check_fingerprint, latest_good_checkpoint
from moe.config import TrainConfig, as_plain_dict, register_configs, to_train_config
from moe.data import prepare_data
from moe.distributed import DistContext, barrier, broadcast_object, init_distributed, shutdown
from moe.model import dense_twin
from moe.run_lock import run_dir_lock
from moe.trainer import Trainer, TrainResult, trajectory_fingerprint

register_configs()


def models_to_train(cfg: TrainConfig) -> list[tuple[str, object]]:
    """(name, ModelConfig) of every model of the experiment, the MoE first."""
    if cfg.model.ffn == "dense":
        return [("dense", cfg.model)]
    twins = [(f"dense_{match}", dense_twin(cfg.model, match)) for match in cfg.twin.match]
    return twins if cfg.twin.only else [("moe", cfg.model)] + twins


def comparison_table(results: dict[str, TrainResult]) -> dict:
    """Per-domain validation loss (nats/token) and perplexity, sizes, throughput of each model."""
    import math
    return {name: {**asdict(r), "val_ppl": {d: math.exp(v) for d, v in r.val_loss.items()}}
            for name, r in results.items()}


def comparison_markdown(table: dict) -> str:
    names = list(table)
    domains = list(next(iter(table.values()))["val_loss"])
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for d in domains:
        lines.append(f"| val loss {d} (nats) | " + " | ".join(f"{table[n]['val_loss'][d]:.4f}" for n in names) + " |")
    for key in ("total_params", "active_params", "flops_per_token"):
        lines.append(f"| {key} | " + " | ".join(f"{table[n]['size'][key]:,}" for n in names) + " |")
    lines.append("| tokens/s | " + " | ".join(f"{table[n]['tokens_per_second']:,.0f}" for n in names) + " |")
    lines.append("| wall (s) | " + " | ".join(f"{table[n]['wall_seconds']:.1f}" for n in names) + " |")
    return "# MoE vs dense twins\n\nSame seed, data order and token budget.\n\n" + "\n".join(lines) + "\n"


def check_resumable(cfg: TrainConfig, run_dir: Path, world_size: int) -> None:
    """Refuse (CheckpointError) a resume whose config differs from a model's newest good checkpoint
    in the run dir, before config.yaml and data/ are rewritten: a refused resume leaves the run's
    own files as they were."""
    for name, model_cfg in models_to_train(cfg):
        found = latest_good_checkpoint(run_dir, name, mmap=True)  # the fingerprint only: map, do not read
        if found is not None:
            path, state = found
            check_fingerprint(state["fingerprint"], trajectory_fingerprint(cfg, model_cfg, world_size), path)


def run_experiment(cfg: TrainConfig, run_dir: str | Path, ctx: DistContext | None = None) -> dict:
    """Prepare data, train every model of the experiment, write the comparison (and analysis),
    holding the run directory's lock on rank 0 (a second run into it stops at once). Returns the
    comparison table."""
    if cfg.backend.name == "megablocks":
        from moe.megablocks_backend import require_megablocks
        require_megablocks()  # no GPU or no MegaBlocks: fail before any data or model work
    ctx = ctx or init_distributed(cfg.trainer.device)
    with run_dir_lock(run_dir) if ctx.is_main else contextlib.nullcontext():
        return _run_experiment(cfg, Path(run_dir), ctx)


def _run_experiment(cfg: TrainConfig, run_dir: Path, ctx: DistContext) -> dict:
    if ctx.is_main:
        check_resumable(cfg, run_dir, ctx.world_size)  # before anything is written into the run dir
    if ctx.is_main:  # rank 0 fills the cache; the others then read it
        data = prepare_data(cfg.data, seed=cfg.seed)
        data.save(run_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(as_plain_dict(cfg)))
    barrier(ctx)
    if not ctx.is_main:
        data = prepare_data(cfg.data, seed=cfg.seed)
    results = {name: Trainer(cfg, model_cfg, name, data, run_dir, ctx).fit() for name, model_cfg in models_to_train(cfg)}
    # Only rank 0 evaluates; every rank returns its table.
    table = broadcast_object(comparison_table(results) if ctx.is_main else None, ctx)
    if ctx.is_main:
        (run_dir / "comparison.json").write_text(json.dumps(table, indent=2))
        (run_dir / "comparison.md").write_text(comparison_markdown(table))
        print(comparison_markdown(table))
        if cfg.analyze and "moe" in table:
            from analysis.run import analyze_run
            analyze_run(run_dir)
    barrier(ctx)
    return table


@hydra.main(version_base="1.3", config_path="pkg://moe.conf", config_name="train")
def hydra_main(dict_cfg: DictConfig) -> float:
    cfg = to_train_config(dict_cfg)
    ctx = init_distributed(cfg.trainer.device)
    try:
        run_dir = broadcast_object(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir, ctx)
        table = run_experiment(cfg, run_dir, ctx)
    finally:
        shutdown(ctx)
    first = next(iter(table.values()))
    return first["val_loss"]["all"]  # the metric a sweeper minimizes


def main() -> None:
    # Under torchrun every rank runs Hydra; only rank 0 should create the run directory (the
    # others learn its path by broadcast), so non-zero ranks write Hydra's files to a temp dir.
    if int(os.environ.get("RANK", "0")) > 0:
        scratch = tempfile.mkdtemp(prefix=f"moe-rank{os.environ['RANK']}-")
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    hydra_main()


if __name__ == "__main__":
    main()
