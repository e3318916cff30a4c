"""The training loop of one model (the MoE or one of its dense twins).

Each step reads in nanoGPT's order: set LR, eval/checkpoint, accumulate micro-batches, clip,
optimizer step, zero grads, balancing bookkeeping, log. Everything the run writes goes to
`<run_dir>/models/<name>/`; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moe.balance import LoadBalancer, max_violation
from moe.checkpoint import (
    SHARDED_SUFFIX,
    check_fingerprint,
    checkpoint_dir,
    checkpoint_path,
    latest_checkpoint,
    latest_good_checkpoint,
    prune_checkpoints,
    remove_orphaned_temp_files,
    save_checkpoint,
    trajectory_fingerprint,
)
from moe.config import TrainConfig, TrainerConfig, as_plain_dict
from moe.data import Batch, PreparedData
from moe.distributed import DistContext, all_reduce_mean, barrier, first_problem
from moe.host_memory import retain_freed_memory
from moe.model import LanguageModel, ModelConfig, model_size
from moe.modes import eval_mode
from moe.parallel import Parallelism, local_tensor
from moe.run_lock import write_error

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the last good checkpoint is left intact."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM / Ctrl-C (or `request_stop`): a checkpoint was saved before stopping."""


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at
    `max_steps`. A pure function of the step, so a resumed run needs no scheduler state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms and biases are not decayed (the aux-free
    router bias is a buffer, outside the optimizer altogether)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def evaluate(
    model: LanguageModel,
    val_batches: dict[str, list[Batch]],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> dict[str, float]:
    """Mean next-token loss (nats/token) per domain, and `all` = mean over domains."""
    losses = {}
    with eval_mode(model), torch.no_grad():
        for domain, batches in val_batches.items():
            total, count = 0.0, 0
            for batch in batches:
                batch = batch.to(device)
                with autocast():
                    out = model(batch.tokens, batch.targets, batch.domain)
                total += float(out.token_loss.sum())
                count += out.token_loss.numel()
            losses[domain] = total / max(count, 1)
    losses["all"] = float(np.mean([losses[d] for d in val_batches]))
    return losses


@dataclass
class TrainResult:
    name: str
    steps: int
    val_loss: dict[str, float]
    size: dict[str, int]
    wall_seconds: float
    tokens_per_second: float
    tokens_seen: int


class Trainer:
    """Trains one model on the prepared data. `fit()` resumes from the newest checkpoint in the
    model's directory when there is one."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_cfg: ModelConfig,
        name: str,
        data: PreparedData,
        run_dir: str | Path,
        ctx: DistContext,
    ):
        self.cfg, self.t, self.name, self.data, self.ctx = cfg, cfg.trainer, name, data, ctx
        self.run_dir = Path(run_dir)
        self.out_dir = self.run_dir / "models" / name
        self.ckpt_dir = checkpoint_dir(run_dir, name)
        self.device = ctx.device
        torch.manual_seed(cfg.seed)  # same seed -> same init for every twin's shared parts
        self.model = LanguageModel(model_cfg, data.vocab_size, cfg.router, cfg.backend.name).to(self.device)
        self.size = model_size(self.model, data.seq_len)
        self.routers = [layer.router for layer in self.model.moe_layers]
        self.balancer = LoadBalancer(cfg.balance, self.routers[0].num_experts) if self.routers else None
        forward: nn.Module = self.model
        if self.t.compile:
            # torch.compile of a module returns a module (an OptimizedModule); its stub says a callable.
            forward = cast(nn.Module, torch.compile(forward))
        # Shards the model in place (experts over the ep ranks, FSDP2): before the optimizer sees it.
        self.parallel = Parallelism(self.t.parallel, ctx)
        self._forward = self.parallel.wrap(self.model, forward)
        self.optimizer = build_optimizer(self.model, self.t, fused=self.device.type == "cuda")
        self.fingerprint = trajectory_fingerprint(cfg, model_cfg, ctx.world_size)
        self.stream = data.train_stream(
            micro_batch_size=self.t.micro_batch_size, rank=ctx.rank, world_size=ctx.world_size
        )
        self.val_batches = {d: data.val_batches(batch_size=self.t.eval_batch_size, domain=d) for d in data.domains}
        self.step = 0
        self._stop_requested = False
        self.on_step_end: Callable[[Trainer], None] | None = None
        self._writer: SummaryWriter | None = None

    # -- bookkeeping -----------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        precision = self.t.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def request_stop(self) -> None:
        """Save a checkpoint at the end of the current step, then raise TrainingInterrupted."""
        self._stop_requested = True

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint, in the consolidated one-process layout whatever the parallel layout (a
        collective when the model is sharded: every rank calls it)."""
        model_state, optimizer_state = self.parallel.full_state(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state, **self._trainer_state()}

    def _trainer_state(self) -> dict[str, Any]:
        """Everything a checkpoint holds besides the model and optimizer states."""
        return {
            "step": self.step,
            "data": self.stream.state_dict(),
            "fingerprint": self.fingerprint,
            "config": as_plain_dict(self.cfg),
            "name": self.name,
            "size": self.size.as_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def save(self, final: bool = False) -> Path | None:
        """Write a checkpoint of this step (a collective); the final one is always consolidated."""
        if self.t.parallel.checkpoint == "sharded" and not final:
            from moe.sharded_checkpoint import save_sharded, sharded_state  # torch.distributed.checkpoint: 0.3 s

            path = save_sharded(
                checkpoint_path(self.ckpt_dir, self.step, sharded=True),
                sharded_state(self.model, self.optimizer, self.parallel),
                self._trainer_state(),
                self.parallel,
            )
            if self.ctx.is_main:
                prune_checkpoints(self.ckpt_dir, self.t.keep_last)
            barrier(self.ctx)
            return path
        consolidated = None
        state = self.state_dict()
        if self.ctx.is_main:
            consolidated = save_checkpoint(self.ckpt_dir, self.step, state, self.t.keep_last)
        barrier(self.ctx)
        return consolidated

    def restore(self) -> bool:
        """Load the newest good checkpoint of this model, if any (a corrupted newer one is skipped with
        a warning). Returns whether one was loaded."""
        if self.ctx.is_main:
            for orphan in remove_orphaned_temp_files(self.ckpt_dir):
                print(f"[{self.name}] removed {orphan}, left by a checkpoint write that was killed")
        # The ranks split the reading of a sharded checkpoint's files and agree on what they found.
        found = latest_good_checkpoint(
            self.run_dir,
            self.name,
            map_location=self.device,
            tensors=False,
            digest_share=(self.ctx.rank, self.ctx.world_size),
            agree=(lambda problem: first_problem(problem, self.ctx)) if self.ctx.enabled else None,
        )
        if found is None:
            self._truncate_metrics(0)  # lines of an attempt killed before its first checkpoint
            return False
        path, state = found
        check_fingerprint(state["fingerprint"], self.fingerprint, path)
        if path.suffix == SHARDED_SUFFIX:
            from moe.sharded_checkpoint import load_sharded

            load_sharded(path, self.model, self.optimizer, self.parallel)
        else:
            self.parallel.load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.stream.load_state_dict(state["data"])
        self.step = int(state["step"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._truncate_metrics(self.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after the checkpoint we resume from (they will be redone), and at
        the final step its evaluation (redone too); a torn line (a crash mid-write) is dropped with
        a note naming the file."""
        path = self.out_dir / "metrics.jsonl"
        if not (self.ctx.is_main and path.exists()):
            return
        keep, torn = [], 0
        for ln in path.read_text().splitlines():
            if not ln.strip():
                continue
            try:
                record = json.loads(ln)
                s = int(record["step"])
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if s < step or (s == step and not (s >= self.t.max_steps and "val_loss" in record)):
                keep.append(ln)
        if torn:
            print(f"[{self.name}] {path}: dropped {torn} unreadable line(s) (a crash while writing?)")
        path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, record: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # a write to an open file does not know its name: say which it was
            clear = write_error(exc, path)
            if clear is None:
                raise
            raise clear from exc
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(key, value, record["step"])
                elif key == "val_loss":
                    for domain, loss in value.items():
                        self._writer.add_scalar(f"val_loss/{domain}", loss, record["step"])

    def _open_tensorboard(self) -> None:
        if not (self.t.tensorboard and self.ctx.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("tensorboard is not installed; metrics go to metrics.jsonl only (pip install tensorboard)")
            return
        self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    # -- the loop --------------------------------------------------------------------------------
    def configure_process(self) -> None:
        """The process-wide settings training runs under: `trainer.threads` and, with
        `trainer.retain_host_memory`, freed CPU memory kept for reuse (`moe.host_memory`)."""
        if self.t.threads:
            torch.set_num_threads(self.t.threads)
        if self.t.retain_host_memory:
            retain_freed_memory()

    def fit(self) -> TrainResult:
        resumed = self.restore()
        self._open_tensorboard()
        self.configure_process()
        if self.ctx.is_main:
            print(
                f"[{self.name}] params total={self.size.total_params:,} active={self.size.active_params:,} "
                f"FLOPs/token={self.size.flops_per_token:,}" + (f" (resumed at step {self.step})" if resumed else "")
            )
        tokens_per_step = self.t.micro_batch_size * self.data.seq_len * self.t.grad_accum_steps * self.ctx.world_size
        start_step, start_time = self.step, time.perf_counter()
        progress = None
        if self.t.progress and self.ctx.is_main:
            from tqdm import tqdm

            progress = tqdm(total=self.t.max_steps, initial=self.step, desc=self.name, dynamic_ncols=True)
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                signal.signal(sig, lambda *_: self.request_stop())
        self.model.train()
        try:
            while self.step < self.t.max_steps:
                lr = lr_at(self.step, self.t)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                if self.step > start_step and self.step % self.t.eval_every == 0:
                    self._eval_and_log()
                if self.step > start_step and self.step % self.t.checkpoint_every == 0:
                    self.save()
                step_start = time.perf_counter()
                stats = self._train_step()
                self.step += 1
                step_seconds = time.perf_counter() - step_start
                if self.step % self.t.log_every == 0 or self.step == self.t.max_steps:
                    self.log(
                        {
                            "step": self.step,
                            "lr": lr,
                            "tokens_per_s": tokens_per_step / step_seconds,
                            "tokens": self.step * tokens_per_step,
                            **stats,
                        }
                    )
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{tokens_per_step / step_seconds:,.0f}")
                if self.on_step_end is not None:
                    self.on_step_end(self)
                if self._stop_agreed():
                    path = self.save()
                    raise TrainingInterrupted(
                        f"[{self.name}] stopped at step {self.step}; checkpoint {path} saved. "
                        "Run the same command with hydra.run.dir=<this run dir> to resume."
                    )
            val = self._eval_and_log()
            self.save(final=True)
        finally:
            for sig, handler in previous.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, handler)
            if progress is not None:
                progress.close()
            if self._writer is not None:
                self._writer.close()
        wall = time.perf_counter() - start_time
        steps_run = self.step - start_step
        return TrainResult(
            self.name,
            self.step,
            val,
            self.size.as_dict(),
            wall,
            steps_run * tokens_per_step / wall if steps_run else 0.0,
            self.step * tokens_per_step,
        )

    def _stop_agreed(self) -> bool:
        if not self.ctx.enabled:
            return self._stop_requested
        flag = torch.tensor([float(self._stop_requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _train_step(self) -> dict[str, Any]:
        accum = self.t.grad_accum_steps
        sums = {"loss": 0.0, "lm_loss": 0.0, "lbl": 0.0, "z_loss": 0.0}
        dropped = 0
        for micro in range(accum):
            batch = next(self.stream).to(self.device)
            # Gradients are reduced over the ranks on the last micro-step only.
            with self.parallel.micro_step(last=micro == accum - 1):
                with self.autocast():
                    out = self._forward(batch.tokens, batch.targets, batch.domain)
                lm_loss = out.loss
                if self.balancer is not None:
                    aux = self.balancer.aux_losses(out.routings, batch.tokens.shape[1])
                    lbl, z, aux_total = aux.lbl, aux.z, aux.total
                    dropped += sum(r.num_dropped() for r in out.routings)
                else:
                    lbl = z = aux_total = torch.zeros((), device=self.device)
                self._check_finite(micro, lm_loss=lm_loss, lbl=lbl, z_loss=z)
                loss = lm_loss + aux_total
                (loss / accum).backward()
            for key, value in (("loss", loss), ("lm_loss", lm_loss), ("lbl", lbl), ("z_loss", z)):
                sums[key] += float(value.detach()) / accum
        grad_norm = self.parallel.finish_gradients(
            list(self.model.parameters()), self.t.grad_clip if self.t.grad_clip > 0 else float("inf")
        )
        if not bool(torch.isfinite(grad_norm)):
            self._diverged("the gradient", "gradient norm", float(grad_norm))
        self.optimizer.step()
        # One sum per tensor and one sync: nan/inf anywhere makes the total non-finite.
        if not bool(torch.isfinite(torch.stack([local_tensor(p).sum() for p in self.model.parameters()]).sum())):
            self._diverged("the parameters after the optimizer step", "a parameter", float("nan"))
        self.optimizer.zero_grad(set_to_none=True)
        # One collective for all scalars rather than one per metric; the dropped assignments are
        # summed over the ranks (each rank drops over its own tokens, as one process over its batch).
        values = torch.tensor([*sums.values(), dropped], device=self.device, dtype=torch.float64)
        *means, mean_dropped = all_reduce_mean(values, self.ctx).tolist()
        stats: dict[str, Any] = dict(zip(sums, means))
        stats["grad_norm"] = float(grad_norm)
        if self.balancer is not None:
            loads = self.balancer.end_step()
            if loads is None:  # there is a balancer only when the model has MoE layers
                raise RuntimeError("no MoE layer routed a token in this step: nothing to balance")
            if self.balancer.adapts_routers:
                for router, load in zip(self.routers, loads):
                    router.after_step(load)
            stats["maxvio"] = [max_violation(c) for c in loads]
            stats["load"] = loads.long().tolist()
            stats["dropped"] = round(mean_dropped * self.ctx.world_size)
        return stats

    def _check_finite(self, micro: int, **components: torch.Tensor) -> None:
        for name, value in components.items():
            if not bool(torch.isfinite(value.detach()).all()):
                self._diverged(f"micro-step {micro}", name, float(value.detach()))

    def _diverged(self, where: str, what: str, value: float) -> None:
        """Stop before a non-finite update is applied or saved; name the first bad parameter."""
        bad = next(
            (
                n
                for n, p in self.model.named_parameters()
                if (p.grad is not None and not bool(torch.isfinite(local_tensor(p.grad)).all()))
                or not bool(torch.isfinite(local_tensor(p)).all())
            ),
            None,
        )
        last = latest_checkpoint(self.run_dir, self.name)
        fix = "lower trainer.lr or raise trainer.warmup_steps" + (
            "" if self.t.grad_clip > 0 else ", or enable trainer.grad_clip (e.g. 1.0)"
        )
        raise TrainingDiverged(
            f"[{self.name}] {what} is {value:.4g} in {where} at step {self.step}"
            + (f"; first non-finite parameter or gradient: {bad}" if bad else "")
            + f". Training stopped before applying it. The last good checkpoint is "
            f"{last or 'none (no checkpoint written yet)'}; {fix}."
        )

    def _eval_and_log(self) -> dict[str, float]:
        val = {}
        # A sharded model's forward is a collective: then every rank evaluates (the same batches).
        if self.ctx.is_main or self.parallel.sharded:
            val = evaluate(self.model, self.val_batches, self.device, self.autocast)
            self.log({"step": self.step, "val_loss": val})
        barrier(self.ctx)
        return val
