"""Training loop: exact resume, divergence handling, checkpoint errors, DDP equivalence."""

import dataclasses
import errno
import json

import pytest
import torch

from moe.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
from moe.data import prepare_data
from moe.distributed import init_distributed
from moe.train import run_experiment
from moe.trainer import Trainer, TrainingDiverged, TrainingInterrupted, lr_at

SMOKE = ("experiment=smoke",)


def losses(run_dir, name="moe"):
    lines = (run_dir / "models" / name / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def make_trainer(cfg, run_dir, name="moe"):
    data = prepare_data(cfg.data, seed=cfg.seed)
    return Trainer(cfg, cfg.model, name, data, run_dir, init_distributed("cpu"))


def test_lr_schedule_warms_up_then_decays_to_min(compose_train):
    t = compose_train(*SMOKE, "trainer.max_steps=100", "trainer.warmup_steps=10").trainer
    assert lr_at(0, t) == pytest.approx(t.lr / 10)
    assert lr_at(9, t) == pytest.approx(t.lr)
    assert lr_at(100, t) == pytest.approx(t.lr * t.min_lr_ratio)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(10, 100))


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("router=sigmoid", "balance=aux_free"),
        ("balance=global_batch",),
        ("trainer.parallel.checkpoint=sharded",),
    ],
)
def test_resume_continues_exactly(compose_train, tmp_path, overrides):
    check_exact_resume(compose_train, tmp_path, overrides)


def test_resume_continues_exactly_in_the_bucketed_padded_layout(compose_train, tmp_path, monkeypatch):
    """32 experts, padding allowed however uneven the loads: every MoE step runs the CPU padded layout
    in two load buckets (`moe.dispatch.load_buckets`), whose bucket membership changes step by step."""
    import moe.experts

    layouts = []
    dispatch = moe.experts.GroupedExperts.dispatch

    def spy(self, routing, cuda):
        d = dispatch(self, routing, cuda)
        layouts.append(None if d.buckets is None else len(d.buckets))
        return d

    monkeypatch.setattr(moe.experts, "CPU_MAX_PADDING", 100.0)
    monkeypatch.setattr(moe.experts.GroupedExperts, "dispatch", spy)
    check_exact_resume(compose_train, tmp_path, ("model.moe.num_experts=32",))
    assert layouts and set(layouts) == {2}


def check_exact_resume(compose_train, tmp_path, overrides):
    cfg = compose_train(*SMOKE, "trainer.checkpoint_every=100", *overrides)
    straight = tmp_path / "straight"
    make_trainer(cfg, straight).fit()

    resumed = tmp_path / "resumed"
    first = make_trainer(cfg, resumed)
    first.on_step_end = lambda tr: tr.request_stop() if tr.step == 3 else None
    with pytest.raises(TrainingInterrupted, match="step 3"):
        first.fit()
    suffix = ".dcp" if "trainer.parallel.checkpoint=sharded" in overrides else ".pt"
    assert latest_checkpoint(resumed, "moe").name == f"step_00000003{suffix}"
    second = make_trainer(cfg, resumed)
    second.fit()
    assert second.step == cfg.trainer.max_steps
    assert losses(resumed) == losses(straight)  # bit-identical per-step losses
    a = torch.load(latest_checkpoint(straight, "moe"), weights_only=False)["model"]
    b = torch.load(latest_checkpoint(resumed, "moe"), weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_last_checkpoints(compose_train, tmp_path):
    cfg = compose_train(*SMOKE, "trainer.checkpoint_every=1", "trainer.keep_last=2")
    make_trainer(cfg, tmp_path).fit()
    names = [p.name for p in list_checkpoints(tmp_path / "models/moe/checkpoints")]
    assert names == ["step_00000005.pt", "step_00000006.pt"]
    assert not list((tmp_path / "models/moe/checkpoints").glob(".*tmp*"))


def test_nan_loss_stops_naming_step_and_component_and_keeps_checkpoint(compose_train, tmp_path):
    cfg = compose_train(*SMOKE, "trainer.checkpoint_every=2")
    trainer = make_trainer(cfg, tmp_path)
    forward = trainer._forward

    def poisoned(tokens, targets, domain=None):  # the LM loss blows up at step 5
        out = forward(tokens, targets, domain)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if trainer.step == 5 else out

    trainer._forward = poisoned
    with pytest.raises(TrainingDiverged, match=r"lm_loss is nan in micro-step 0 at step 5.*step_00000004\.pt"):
        trainer.fit()
    good = latest_checkpoint(tmp_path, "moe")
    state = torch.load(good, weights_only=False)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_checkpoint_from_another_config_is_refused(compose_train, tmp_path):
    make_trainer(compose_train(*SMOKE), tmp_path).fit()
    other = compose_train(*SMOKE, "model.moe.num_experts=8")
    with pytest.raises(
        CheckpointError, match=r"(?s)different configuration.*model.moe.num_experts: checkpoint=4 now=8"
    ):
        make_trainer(other, tmp_path).fit()


def test_corrupted_checkpoint_is_named_and_skipped(compose_train, tmp_path):
    cfg = compose_train(*SMOKE, "trainer.checkpoint_every=2", "trainer.keep_last=2")
    make_trainer(cfg, tmp_path).fit()
    older, newest = list_checkpoints(tmp_path / "models" / "moe" / "checkpoints")
    newest.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match=rf"(?s)resuming from .*{older.name}.*{newest.name}"):
        make_trainer(cfg, tmp_path).fit()  # resumes from the older one and finishes
    for path in list_checkpoints(tmp_path / "models" / "moe" / "checkpoints"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="(?s)no usable checkpoint.*step_00000006.pt does not match the digest"):
        make_trainer(cfg, tmp_path).fit()


def test_experiment_trains_moe_and_both_twins_with_same_data(compose_train, tmp_path):
    cfg = compose_train(*SMOKE, "twin.match=[active,total]")
    table = run_experiment(cfg, tmp_path)
    assert list(table) == ["moe", "dense_active", "dense_total"]
    sizes = {n: r["size"] for n, r in table.items()}
    assert sizes["dense_total"]["total_params"] > sizes["dense_active"]["total_params"]
    assert all(r["tokens_seen"] == table["moe"]["tokens_seen"] for r in table.values())
    assert set(table["moe"]["val_loss"]) == {"syn00", "syn01", "syn02", "syn03", "all"}
    assert (tmp_path / "comparison.md").exists() and (tmp_path / "data/manifest.json").exists()


def test_incomplete_sharded_checkpoint_is_named_and_skipped(compose_train, tmp_path):
    """A sharded checkpoint missing a file (a write killed before the rename cannot leave one, but
    a copy can) is skipped, named, for the one before it; read whole it equals the trained model."""
    cfg = compose_train(
        *SMOKE, "trainer.parallel.checkpoint=sharded", "trainer.checkpoint_every=2", "trainer.keep_last=3"
    )
    trainer = make_trainer(cfg, tmp_path)
    trainer.fit()
    checkpoints = list_checkpoints(tmp_path / "models" / "moe" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_00000002.dcp", "step_00000004.dcp", "step_00000006.pt"]
    checkpoints[-1].unlink()
    whole = load_checkpoint(checkpoints[1])
    assert whole["step"] == 4 and whole["model"].keys() == trainer.model.state_dict().keys()
    (checkpoints[1] / ".metadata").unlink()
    with pytest.warns(UserWarning, match=r"(?s)resuming from .*step_00000002.dcp.*step_00000004.dcp lacks .metadata"):
        make_trainer(cfg, tmp_path).fit()


def test_damaged_shard_is_found_by_its_digest_before_loading(compose_train, tmp_path):
    """torch.distributed.checkpoint's files carry no checksum: a flipped byte in a shard would load
    as a silently different weight. The digests recorded at writing name the file; the resume falls
    back to the checkpoint before, and the analysis's whole read refuses it."""
    cfg = compose_train(
        *SMOKE, "trainer.parallel.checkpoint=sharded", "trainer.checkpoint_every=2", "trainer.keep_last=3"
    )
    make_trainer(cfg, tmp_path).fit()
    checkpoints = list_checkpoints(tmp_path / "models" / "moe" / "checkpoints")
    checkpoints[-1].unlink()  # the final, consolidated one: resume from the sharded ones
    newest = checkpoints[1]
    record = (newest / "files.sha256").read_text()
    shards = sorted(newest.glob("*.distcp"))
    assert shards and all(p.name in record for p in [*shards, newest / ".metadata", newest / "trainer.pt"])
    data = bytearray(shards[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors
    shards[0].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shards[0].name} does not match its digest"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=r"(?s)resuming from .*step_00000002.dcp.*modified or damaged"):
        make_trainer(cfg, tmp_path).fit()
    shards = sorted(checkpoints[0].glob("*.distcp"))
    shards[0].write_bytes(shards[0].read_bytes()[:-10])  # truncated, as by an interrupted copy
    with pytest.raises(CheckpointError, match=r"has \d+ bytes, \d+ when written"):
        load_checkpoint(checkpoints[0])


def test_a_sharded_checkpoint_that_cannot_be_written_names_the_directory_and_the_fix(
    compose_train, tmp_path, monkeypatch
):
    import torch.distributed.checkpoint as dcp

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", full_disk)
    cfg = compose_train(*SMOKE, "trainer.parallel.checkpoint=sharded")
    with pytest.raises(CheckpointError, match=r"could not write .*step_00000003.dcp: No space left on device.*free"):
        make_trainer(cfg, tmp_path).fit()
