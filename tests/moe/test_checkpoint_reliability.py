"""Faults that must never lose a run or give a silent wrong result: corrupted checkpoints,
non-finite updates, killed writes, torn and duplicated metric lines, code in pickles."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from moe.checkpoint import (
    CheckpointError,
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_orphaned_temp_files,
    save_checkpoint,
)
from moe.data import prepare_data
from moe.distributed import init_distributed
from moe.trainer import Trainer, TrainingDiverged

SMOKE = ("experiment=smoke",)


def make_trainer(cfg, run_dir, name="moe"):
    return Trainer(cfg, cfg.model, name, prepare_data(cfg.data, seed=cfg.seed), run_dir, init_distributed("cpu"))


def _metric_steps(run_dir, key=None):
    lines = (run_dir / "models" / "moe" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln)["step"] for ln in lines if key is None or key in json.loads(ln)]


def test_corrupted_newest_checkpoint_falls_back_with_a_warning(compose_train, tmp_path):
    make_trainer(compose_train(*SMOKE, "trainer.checkpoint_every=2", "trainer.keep_last=3"), tmp_path).fit()
    files = list_checkpoints(tmp_path / "models" / "moe" / "checkpoints")
    newest, previous = files[-1], files[-2]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 64])
    newest.write_bytes(bytes(data))  # same size, different content
    with pytest.raises(CheckpointError, match="does not match the digest"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=rf"(?s)resuming from .*{previous.name}.*{newest.name}"):
        path, state = latest_good_checkpoint(tmp_path, "moe")
    assert path == previous and state["step"] == int(previous.stem.split("_")[1])
    for p in files:
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        latest_good_checkpoint(tmp_path, "moe")


def test_non_finite_gradient_is_never_applied_nor_saved(compose_train, tmp_path):
    trainer = make_trainer(compose_train(*SMOKE, "trainer.checkpoint_every=2"), tmp_path)
    param = next(trainer.model.parameters())

    def poison(grad):  # the loss stays finite; one gradient does not, at step 3
        return grad * float("inf") if trainer.step == 3 else grad
    param.register_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"gradient norm is (inf|nan) .* at step 3.*first non-finite"):
        trainer.fit()
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())  # the step was not applied
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(tmp_path / "x", 1, {"model": {"w": torch.tensor([1.0, float("nan")])}, "step": 1}, 1)
    assert not (tmp_path / "x" / "step_00000001.pt").exists()


def test_orphaned_temp_files_are_removed_and_live_ones_kept(tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    orphan = tmp_path / f".step_00000004.pt.tmp-{dead}"
    live = tmp_path / f".step_00000006.pt.tmp-{os.getpid()}"
    for p in (orphan, live):
        p.write_bytes(b"x" * 10)
    assert remove_orphaned_temp_files(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists()


def test_checkpoint_loading_executes_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    path = tmp_path / "step_00000001.pt"
    torch.save({"model": {}, "step": 1, "payload": Evil()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_metrics_survive_a_torn_line_a_killed_first_attempt_and_a_rerun(compose_train, tmp_path, capsys):
    cfg = compose_train(*SMOKE, "trainer.checkpoint_every=1000", "trainer.log_every=1")
    metrics = tmp_path / "models" / "moe" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    # A first attempt killed before its first checkpoint, whose last line was torn by the crash.
    metrics.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.9}\n{"step": 3, "lo')
    make_trainer(cfg, tmp_path).fit()
    assert "dropped 1 unreadable line" in capsys.readouterr().out
    steps = _metric_steps(tmp_path, "loss")
    assert steps == sorted(set(steps)) and steps[0] == 1  # no duplicated steps
    finals = _metric_steps(tmp_path, "val_loss")
    make_trainer(cfg, tmp_path).fit()  # rerunning the finished run
    assert _metric_steps(tmp_path, "val_loss") == finals and _metric_steps(tmp_path, "loss") == steps


def test_a_refused_resume_leaves_the_run_files_untouched(compose_train, tmp_path):
    from moe.train import run_experiment

    cfg = compose_train(*SMOKE, "twin.match=[]", "analyze=false")
    run_experiment(cfg, tmp_path)
    files = {p: p.read_bytes() for p in [tmp_path / "config.yaml", *sorted((tmp_path / "data").rglob("*"))]
             if p.is_file()}
    for override in ("trainer.lr=0.5", "trainer.precision=bf16"):
        with pytest.raises(CheckpointError, match=override.split("=")[0].split(".")[-1]):
            run_experiment(compose_train(*SMOKE, "twin.match=[]", "analyze=false", override), tmp_path)
        assert {p: p.read_bytes() for p in files} == files  # config.yaml and data/ byte-identical


def test_a_second_writer_stops_at_once_naming_the_holder(compose_train, tmp_path):
    from moe.run_lock import RunDirLocked, run_dir_lock
    from moe.train import run_experiment

    with run_dir_lock(tmp_path):
        with pytest.raises(RunDirLocked, match=rf"in use by pid {os.getpid()}"):
            run_experiment(compose_train(*SMOKE, "twin.match=[]", "analyze=false"), tmp_path)
        assert not (tmp_path / "config.yaml").exists()  # nothing written by the refused run
    with run_dir_lock(tmp_path):  # released on exit, reusable
        pass
