"""Train an MoE LM and its matched dense twins on one data stream, then compare them.

    python -m moe.train                         # train and compare only (no analysis)
    torchrun --nproc_per_node=2 -m moe.train trainer.device=cpu

The main job, `moe-train` (`analysis.pipeline`), is this same Hydra app with the analysis run after
training (`analyze=true`, its default): the analysis imports `moe`, never the reverse, so the step
that needs both lives there and reaches this module through `run_experiment(after_training=...)`.

Everything lands in the Hydra run directory: config.yaml, data/ (manifest, tokenizer),
models/<name>/ (checkpoints, metrics.jsonl, tensorboard/), comparison.json/.md, analysis/ (moe-train),
and Hydra's .hydra/ (config, hydra, overrides).

Nothing is written into the run directory before the run is known to be good: config, writability
of the run directory, the lock, and the compatibility of a resumed run's checkpoints are checked
first, so a refused run leaves the directory byte-identical. That is also why conf/train.yaml tells
Hydra not to write .hydra/ (this module writes it after the checks) and to open its log file only
when something is logged.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from moe.checkpoint import check_fingerprint, latest_good_checkpoint, trajectory_fingerprint
from moe.config import TrainConfig, as_plain_dict, models_to_train, register_configs, to_train_config
from moe.data import prepare_data
from moe.distributed import DistContext, barrier, broadcast_object, collectives_watched, init_distributed, shutdown
from moe.parallel import check_parallel
from moe.run_lock import check_writable, run_dir_lock, write_error
from moe.tables import markdown_table, write_json
from moe.trainer import Trainer, TrainResult

register_configs()

# Where Hydra would write its own files (its default `hydra.output_subdir`); see hydra_files.
HYDRA_SUBDIR = ".hydra"


def comparison_table(results: dict[str, TrainResult]) -> dict:
    """Per-domain validation loss (nats/token) and perplexity, sizes, throughput of each model."""
    import math

    return {
        name: {**asdict(r), "val_ppl": {d: math.exp(v) for d, v in r.val_loss.items()}} for name, r in results.items()
    }


def comparison_markdown(table: dict) -> str:
    names = list(table)
    domains = list(next(iter(table.values()))["val_loss"])
    rows = [[f"val loss {d} (nats)", *(f"{table[n]['val_loss'][d]:.4f}" for n in names)] for d in domains]
    rows += [
        [key, *(f"{table[n]['size'][key]:,}" for n in names)]
        for key in ("total_params", "active_params", "flops_per_token")
    ]
    rows.append(["tokens/s", *(f"{table[n]['tokens_per_second']:,.0f}" for n in names)])
    rows.append(["wall (s)", *(f"{table[n]['wall_seconds']:.1f}" for n in names)])
    return (
        "# MoE vs dense twins\n\nSame seed, data order and token budget.\n\n"
        + markdown_table(["", *names], rows)
        + "\n"
    )


def check_resumable(cfg: TrainConfig, run_dir: Path, world_size: int) -> None:
    """Refuse (CheckpointError) a resume whose config differs from a model's newest good checkpoint
    in the run dir, before config.yaml and data/ are rewritten: a refused resume leaves the run's
    own files as they were."""
    for name, model_cfg in models_to_train(cfg):
        # The fingerprint only: map a file, do not read it; a sharded checkpoint's trainer state only.
        found = latest_good_checkpoint(run_dir, name, mmap=True, tensors=False)
        if found is not None:
            path, state = found
            check_fingerprint(state["fingerprint"], trajectory_fingerprint(cfg, model_cfg, world_size), path)


def run_experiment(
    cfg: TrainConfig,
    run_dir: str | Path,
    ctx: DistContext | None = None,
    extra_files: Mapping[str, str] | None = None,
    after_training: Callable[[Path], object] | None = None,
) -> dict:
    """Prepare data, train every model of the experiment, write the comparison, holding the run
    directory's lock on rank 0 (a second run into it stops at once). Returns the comparison table.

    `after_training(run_dir)` runs on rank 0, still under the lock, once the comparison is written,
    when `cfg.analyze` is true and the run trained an MoE (`analysis.pipeline` passes the analysis).

    Nothing is written into `run_dir` until the checks pass (writability, lock, resume
    compatibility); `extra_files` ({relative path: text}, e.g. Hydra's .hydra/ files) are written
    then, with config.yaml. A write that fails for lack of space or permission stops the run with
    one line naming the path; a rank that stops answering stops it naming the rank."""
    if cfg.backend.name == "megablocks":
        from moe.megablocks_backend import require_megablocks

        require_megablocks()  # no GPU or no MegaBlocks: fail before any data or model work
    ctx = ctx or init_distributed(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    check_parallel(
        cfg.trainer.parallel,
        ctx.world_size,
        routed_experts=cfg.model.moe.routed_experts,
        backend=cfg.backend.name,
        compile=cfg.trainer.compile,
    )
    run_dir = Path(run_dir)
    try:
        if ctx.is_main:  # before the lock file is created, so a read-only run dir fails here, clearly
            check_writable(run_dir, [name for name, _ in models_to_train(cfg)])
        with run_dir_lock(run_dir) if ctx.is_main else contextlib.nullcontext(), collectives_watched(ctx):
            return _run_experiment(cfg, run_dir, ctx, extra_files or {}, after_training)
    except OSError as exc:
        clear = write_error(exc, run_dir)
        if clear is None:
            raise
        raise clear from exc


def _run_experiment(
    cfg: TrainConfig,
    run_dir: Path,
    ctx: DistContext,
    extra_files: Mapping[str, str],
    after_training: Callable[[Path], object] | None,
) -> dict:
    analyze = cfg.analyze and after_training is not None
    if ctx.is_main:
        check_resumable(cfg, run_dir, ctx.world_size)  # before anything is written into the run dir
    if ctx.is_main:  # rank 0 fills the cache; the others then read it
        data = prepare_data(cfg.data, seed=cfg.seed)
        if analyze and cfg.model.ffn == "moe" and not cfg.twin.only and len(data.domains) < 2:
            # The analysis at the end would refuse it: say so before the training, not after.
            raise ValueError(
                f"analyze=true, but the corpus has only the domain(s) {data.domains}: domain "
                "specialization needs at least two. Add domains, or set analyze=false to train "
                "without the analysis."
            )
        data.save(run_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(as_plain_dict(cfg)))
        for relative, text in extra_files.items():
            (run_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / relative).write_text(text)
    barrier(ctx)
    if not ctx.is_main:
        data = prepare_data(cfg.data, seed=cfg.seed)
    results = {
        name: Trainer(cfg, model_cfg, name, data, run_dir, ctx).fit() for name, model_cfg in models_to_train(cfg)
    }
    # Only rank 0 evaluates; every rank returns its table.
    table = broadcast_object(comparison_table(results) if ctx.is_main else None, ctx)
    if ctx.is_main:
        write_json(run_dir / "comparison.json", table, indent=2)
        (run_dir / "comparison.md").write_text(comparison_markdown(table))
        print(comparison_markdown(table))
        if analyze and after_training is not None and "moe" in table:
            after_training(run_dir)
    barrier(ctx)
    return table


def hydra_files(task_cfg: DictConfig) -> dict[str, str]:
    """Hydra's own record of the job (.hydra/config.yaml, hydra.yaml, overrides.yaml), as Hydra
    writes it. conf/train.yaml sets `hydra.output_subdir: null` so that Hydra does not write these
    before the run is validated (a refused resume would otherwise overwrite them); run_experiment
    writes them once the checks pass."""
    hydra_cfg = HydraConfig.instance().cfg  # {hydra: ...}, as Hydra saves it
    return {
        f"{HYDRA_SUBDIR}/config.yaml": OmegaConf.to_yaml(task_cfg),
        f"{HYDRA_SUBDIR}/hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
        f"{HYDRA_SUBDIR}/overrides.yaml": OmegaConf.to_yaml(HydraConfig.get().overrides.task),
    }


def hydra_app(after_training: Callable[[Path], object] | None = None) -> Callable[[], object]:
    """The Hydra app on conf/train.yaml; `after_training` as in `run_experiment`."""

    @hydra.main(version_base="1.3", config_path="pkg://moe.conf", config_name="train")
    def app(dict_cfg: DictConfig) -> float:
        cfg = to_train_config(dict_cfg)
        ctx = init_distributed(cfg.trainer.device, cfg.trainer.dist_timeout_s)
        try:
            run_dir = broadcast_object(HydraConfig.get().runtime.output_dir, ctx)
            if after_training is None and cfg.analyze and cfg.model.ffn == "moe" and not cfg.twin.only and ctx.is_main:
                print(
                    f"note: python -m moe.train trains and compares only; analyze this run with `moe-analyze "
                    f"run_dir={run_dir}`, or train with `moe-train`, which analyzes after training"
                )
            table = run_experiment(
                cfg,
                run_dir,
                ctx,
                extra_files=hydra_files(dict_cfg) if ctx.is_main else None,
                after_training=after_training,
            )
        finally:
            shutdown(ctx)
        first = next(iter(table.values()))
        return first["val_loss"]["all"]  # the metric a sweeper minimizes

    return app


def main(after_training: Callable[[Path], object] | None = None) -> None:
    """Run the Hydra app from the command line (`python -m moe.train`: no analysis)."""
    # Under torchrun every rank runs Hydra; only rank 0 should create the run directory (the
    # others learn its path by broadcast), so non-zero ranks write Hydra's files to a temp dir.
    if int(os.environ.get("RANK", "0")) > 0:
        scratch = tempfile.mkdtemp(prefix=f"moe-rank{os.environ['RANK']}-")
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    hydra_app(after_training)()


if __name__ == "__main__":
    main()
