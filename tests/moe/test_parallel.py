"""Expert parallelism and FSDP2 (moe.parallel) against one process on the same global batch.

The multi-process runs are torchrun launches of `parallel_worker.py` over gloo; the reference
repeats the same two optimizer steps in this process with the plain model: the step's loss is the
mean over the ranks' rows of each rank's token-mean loss (plus its balancing terms), which is what
data parallelism optimizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.balance import load_balancing_loss
from moe.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints, load_checkpoint
from moe.parallel import ParallelConfig, check_parallel

sys.path.insert(0, str(Path(__file__).parent))
import parallel_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "parallel_worker.py"


def launch(tmp_path: Path, nproc: int, layouts: list[str]) -> dict:
    out = tmp_path / f"n{nproc}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*cmd, str(WORKER), str(out), *layouts], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def reference(case: str, world: int) -> dict:
    """The same two steps in one process: each rank's rows forwarded separately, losses averaged."""
    model, balancer, tcfg = worker.build(case)
    optimizer = worker.build_optimizer(model, tcfg)
    rows = worker.ROWS_PER_RANK
    record: dict = {"loss": [], "lbl": []}
    with torch.no_grad():  # the whole global batch as one micro-batch: what a layout must not change
        whole = model(*worker.global_batch(world, 0)).routings
        record["lbl_whole_batch"] = float(
            torch.stack([load_balancing_loss(r.probs, r.indices, balancer.num_experts) for r in whole]).mean()
        )
    for step in range(2):
        tokens, targets = worker.global_batch(world, step)
        outs = [model(tokens[r * rows : (r + 1) * rows], targets[r * rows : (r + 1) * rows]) for r in range(world)]
        lbls = [balancer_terms(balancer, out.routings, outs) for out in outs]
        total = sum(out.loss + aux for out, (aux, _) in zip(outs, lbls)) / world
        total.backward()
        record["loss"].append([float(out.loss.detach()) for out in outs])
        record["lbl"].append([float(lbl.detach()) for _, lbl in lbls])
        if step == 0:
            record["routing"] = [[(r.indices, r.kept, r.weights.detach()) for r in out.routings] for out in outs]
        max_norm = tcfg.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if step == 0:
            record["grad_norm"] = float(norm)
            record["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if balancer.adapts_routers:
            loads = sum(torch.stack([r.selected_counts() for r in out.routings]).double() for out in outs)
            for layer, load in zip(model.moe_layers, loads):
                layer.router.after_step(load)
    record["final_state"] = model.state_dict()
    return record


def balancer_terms(balancer, routings, outs) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux loss term, lbl) of one rank's routings; global_batch counts are those of all ranks."""
    cfg, E = balancer.cfg, balancer.num_experts
    z = torch.stack([torch.logsumexp(r.logits, -1).pow(2).mean() for r in routings]).mean()
    if cfg.scope == "micro_batch":
        lbl = torch.stack([load_balancing_loss(r.probs, r.indices, E) for r in routings]).mean()
    elif cfg.scope == "global_batch":
        per_layer = []
        for i, r in enumerate(routings):
            counts = sum(o.routings[i].selected_counts().double() for o in outs)
            per_layer.append(
                load_balancing_loss(r.probs, r.indices, E, counts_E=counts, num_tokens=float(counts.sum()) / r.top_k)
            )
        lbl = torch.stack(per_layer).mean()
    else:
        lbl = torch.zeros(())
    return cfg.lbl_coef * lbl + cfg.z_coef * z, lbl


def assert_matches(got: list[dict], want: dict, world: int) -> None:
    for r in range(world):
        for step in range(2):
            assert got[r]["loss"][step] == pytest.approx(want["loss"][step][r], rel=1e-5, abs=1e-6)
            assert got[r]["lbl"][step] == pytest.approx(want["lbl"][step][r], rel=1e-5, abs=1e-6)
        for (gi, gk, gw), (wi, wk, ww) in zip(got[r]["routing"], want["routing"][r]):
            assert torch.equal(gi, wi) and torch.equal(gk, wk)
            torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-6)
    assert got[0]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert got[0]["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        for r in range(world):  # every rank holds the same synchronized gradient
            torch.testing.assert_close(
                got[r]["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
            )
    # After two AdamW steps (lr 0.02): Adam divides by sqrt(v), so float32 noise in a near-zero
    # gradient moves an element by up to ~1e-4 (a near-tie in sign); a wrong gradient moves it by ~lr.
    for name, value in want["final_state"].items():
        torch.testing.assert_close(
            got[0]["final_state"][name], value, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


# Layouts "ep:fsdp" per world size: DDP, EP=2, FSDP2 alone; EP=2 x DP=2, EP=4, FSDP2 x EP=2.
LAYOUTS = {2: ["1:0", "2:0", "1:1"], 4: ["2:0", "4:0", "2:1"]}


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", sorted(LAYOUTS))
def test_parallel_layouts_match_one_process(tmp_path, nproc):
    results = launch(tmp_path, nproc, LAYOUTS[nproc])
    wants = {case: reference(case, nproc) for case in worker.CASES}
    for layout in LAYOUTS[nproc]:
        for case, want in wants.items():
            assert_matches(results[layout][case], want, nproc)
        # Global-batch balancing keeps its scale at any layout (unlike Megatron-Core's,
        # NVIDIA/Megatron-LM #3672): the ranks' mean loss is the whole global batch's on one process.
        mean_lbl = sum(r["lbl"][0] for r in results[layout]["topk_global"]) / nproc
        assert mean_lbl == pytest.approx(wants["topk_global"]["lbl_whole_batch"], rel=1e-5)


@pytest.mark.parametrize(
    ("cfg", "world", "kwargs", "message"),
    [
        (ParallelConfig(ep=2), 1, {}, "one process: launch with torchrun"),
        (ParallelConfig(ep=3), 4, {}, "must divide the number of processes"),
        (ParallelConfig(ep=4), 4, {"routed_experts": 6}, "must divide the routed experts"),
        (ParallelConfig(ep=2), 2, {"backend": "megablocks"}, "use backend=native"),
        (ParallelConfig(ep=2), 2, {"compile": True}, "trainer.compile=false"),
        (ParallelConfig(ep=0), 2, {}, "must be >= 1"),
    ],
)
def test_unsupported_layouts_fail_before_training(cfg, world, kwargs, message):
    args = {"routed_experts": 8, "backend": "native", "compile": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        check_parallel(cfg, world, **args)


# -- end to end: the Hydra app under torchrun -------------------------------------------------------
SMOKE = ["experiment=smoke", "trainer.device=cpu", "twin.match=[]", "model.moe.num_experts=4", "trainer.eval_every=100"]


def train(run_dir: Path, nproc: int, *overrides: str) -> str:
    """Train the smoke experiment into run_dir on `nproc` processes; returns its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "moe.train", *SMOKE, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def step_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "models" / "moe" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(latest_checkpoint(run_dir, "moe"), weights_only=False)["model"]


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_runs_match_one_process_and_resume_at_other_world_sizes(tmp_path):
    """An ep=2 x dp=2 run (sharded checkpoints) and an FSDP2 run (consolidated ones) train the losses
    and weights of one process on the same global batch. Saved at step 3, each continues as it did
    at another world size and layout with the same micro-batches per step: the sharded checkpoint
    at 2 ranks (ep=2) and at 1, the consolidated one under FSDP2 x ep=2. A sharded checkpoint
    reads whole in one process as the one-process checkpoint of that step."""
    one = ["trainer.micro_batch_size=1"]
    single, four, fsdp = tmp_path / "single", tmp_path / "four", tmp_path / "fsdp"
    train(single, 1, *one, "trainer.grad_accum_steps=4")
    train(four, 4, *one, "trainer.parallel.ep=2", "trainer.parallel.checkpoint=sharded")
    train(fsdp, 2, *one, "trainer.grad_accum_steps=2", "trainer.parallel.fsdp=true")
    want, want_model = step_losses(single), final_model(single)
    for run in (four, fsdp):
        assert step_losses(run) == pytest.approx(want, rel=1e-4, abs=1e-5)
        got = final_model(run)
        assert got.keys() == want_model.keys()
        for name, value in want_model.items():
            torch.testing.assert_close(got[name], value, rtol=1e-3, atol=2e-4)
    sharded = checkpoint_dir(four, "moe") / "step_00000003.dcp"
    assert sorted(p.name for p in list_checkpoints(checkpoint_dir(four, "moe"))) == [sharded.name, "step_00000006.pt"]
    step3 = load_checkpoint(checkpoint_dir(single, "moe") / "step_00000003.pt")["model"]
    whole = load_checkpoint(sharded)["model"]
    recorded = [line.split(" ", 2)[2] for line in (sharded / "files.sha256").read_text().splitlines()]
    assert recorded == sorted(p.name for p in sharded.iterdir() if p.name != "files.sha256")  # 4 ranks' shares
    assert whole.keys() == step3.keys()
    for name, value in step3.items():
        torch.testing.assert_close(whole[name], value, rtol=1e-3, atol=2e-4)

    resumes = [
        (four, 2, ["trainer.grad_accum_steps=2", "trainer.parallel.ep=2"]),
        (four, 1, ["trainer.grad_accum_steps=4"]),
        (fsdp, 2, ["trainer.grad_accum_steps=2", "trainer.parallel.ep=2", "trainer.parallel.fsdp=true"]),
    ]
    for i, (saved, nproc, overrides) in enumerate(resumes):
        resumed = tmp_path / f"{saved.name}_resumed_{i}"
        shutil.copytree(saved, resumed)
        (checkpoint_dir(resumed, "moe") / "step_00000006.pt").unlink()  # back to step 3
        assert "(resumed at step 3)" in train(resumed, nproc, *one, *overrides)
        assert step_losses(resumed) == pytest.approx(want, rel=1e-4, abs=1e-5)
