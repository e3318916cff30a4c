"""Issue 17, fault by fault on tiny runs: no silent wrong result, no lost run.

Each test injects one fault the way it happens in practice (kill -9 mid-checkpoint, a flipped bit, a
non-finite gradient, a second writer, a changed config on resume, a torn metrics line, a stopped
rank, a full disk, a read-only directory, a one-domain corpus) and asserts what the user gets: a run
that resumes to the same result, or one clear refusal that changes nothing. Unit tests of the
checkpoint module itself live in tests/moe/test_checkpoint_reliability.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from moe.data import prepare_data
from moe.distributed import init_distributed
from moe.run_lock import RunDirLocked, RunDirNotWritable, run_dir_lock
from moe.train import run_experiment
from moe.trainer import Trainer, TrainingDiverged

# One thread: tiny models run much faster so when another process competes for the cores, and the
# in-process reference must compute exactly as the subprocesses do.
TINY = ("experiment=smoke", "twin.match=[]", "analyze=false", "trainer.threads=1")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """trainer.threads sets torch's thread count for the whole process: give it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make_trainer(cfg, run_dir, name="moe"):
    return Trainer(cfg, cfg.model, name, prepare_data(cfg.data, seed=cfg.seed), run_dir, init_distributed("cpu"))


def metric_records(run_dir, name="moe"):
    return [json.loads(ln) for ln in (Path(run_dir) / "models" / name / "metrics.jsonl").read_text().splitlines()]


def digest(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every file under `run_dir`, by relative path (hidden files included)."""
    return {
        p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def moe_train(*args: str, run_dir: Path, stdout: int = subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "moe.train", *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def error_line(stderr: str) -> str:
    """The last line of a failed Hydra app's stderr, Hydra's hint about HYDRA_FULL_ERROR aside."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln][-1]


# --------------------------------------------------------------------------- kill -9, then resume
KILLED = (
    *TINY,
    "trainer.max_steps=30",
    "trainer.checkpoint_every=1",
    "trainer.keep_last=2",
    "trainer.eval_every=1000",
    "trainer.log_every=1",
)
_TEMP = re.compile(r"^\.step_(\d{8})\.pt.*\.tmp-\d+$")


def kill_mid_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, from_step: int, timeout: float = 120) -> int:
    """SIGKILL `proc` while it writes a checkpoint of step >= from_step (its temporary file exists);
    returns that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            names = os.listdir(ckpt_dir)
        except FileNotFoundError:
            time.sleep(0.05)
            continue
        steps = [int(m.group(1)) for m in map(_TEMP.match, names) if m]
        if steps and max(steps) >= from_step:
            proc.kill()
            proc.wait()
            return max(steps)
    raise AssertionError(
        f"no checkpoint write from step {from_step} on was caught; the run ended with "
        f"{proc.poll()}: {proc.stderr.read()[-2000:] if proc.stderr else ''}"
    )


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A run killed -9 in the middle of a checkpoint write at a random step, then rerun to the end."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    step = random.Random().randint(3, 20)
    proc = moe_train(*KILLED, run_dir=run_dir, stdout=subprocess.DEVNULL)  # not read while it runs
    killed_at = kill_mid_checkpoint(proc, run_dir / "models" / "moe" / "checkpoints", step)
    assert proc.returncode == -signal.SIGKILL
    rc, out, err = finish(moe_train(*KILLED, run_dir=run_dir))
    assert rc == 0, err[-3000:]
    return run_dir, killed_at, out


def test_kill_9_mid_checkpoint_then_resume_equals_an_uninterrupted_run(killed_and_resumed, compose_train, tmp_path):
    run_dir, killed_at, out = killed_and_resumed
    reference = tmp_path / "reference"
    run_experiment(compose_train(*KILLED), reference)
    a = load_checkpoint(latest_checkpoint(run_dir, "moe"))
    b = load_checkpoint(latest_checkpoint(reference, "moe"))
    assert a["step"] == b["step"] == 30
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), f"killed at step {killed_at}"
    losses = [(r["step"], r["loss"]) for r in metric_records(run_dir) if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in metric_records(reference) if "loss" in r]
    assert [s for s, _ in losses] == list(range(1, 31))  # every step once, none duplicated
    ckpt_dir = run_dir / "models" / "moe" / "checkpoints"
    assert not [p for p in ckpt_dir.iterdir() if ".tmp-" in p.name]  # the killed write's temp file is gone
    assert "resumed at step" in out


def test_a_refused_resume_leaves_every_file_of_the_run_dir_byte_identical(killed_and_resumed):
    """Hydra's own files (.hydra/*.yaml, the log) included: the run dir is compared by digest."""
    run_dir = killed_and_resumed[0]
    before = digest(run_dir)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "config.yaml", "data/manifest.json"} <= set(before)
    rc, _, err = finish(moe_train(*KILLED, "data.synthetic.vocab_size=300", run_dir=run_dir))
    assert rc != 0 and "data.synthetic.vocab_size: checkpoint=256 now=300" in err, err[-2000:]
    assert digest(run_dir) == before


def test_a_refused_resume_in_process_leaves_the_run_dir_untouched(killed_and_resumed, compose_train, tmp_path):
    run_dir = shutil.copytree(killed_and_resumed[0], tmp_path / "run")
    before = digest(run_dir)
    for override in ("trainer.lr=0.5", "trainer.precision=bf16"):
        with pytest.raises(CheckpointError, match=override.split("=")[0].split(".")[-1]):
            run_experiment(compose_train(*KILLED, override), run_dir)
        assert digest(run_dir) == before


# --------------------------------------------------------------------------- damaged checkpoints
def test_bit_flip_in_the_newest_checkpoint_falls_back_to_the_previous_one(compose_train, tmp_path):
    make_trainer(compose_train(*TINY, "trainer.checkpoint_every=2", "trainer.keep_last=3"), tmp_path).fit()
    files = list_checkpoints(tmp_path / "models" / "moe" / "checkpoints")
    newest, previous = files[-1], files[-2]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64])
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


def test_analysis_refuses_a_checkpoint_its_run_config_did_not_write(killed_and_resumed, tmp_path):
    """The trainer's fingerprint, checked by the analysis too: config.yaml (and data/) rewritten
    under a checkpoint, as a refused resume used to do, is not analyzed silently."""
    from moe.loading import load_model

    run_dir = shutil.copytree(killed_and_resumed[0], tmp_path / "run")
    load_model(run_dir, "moe")  # consistent: loads
    config = run_dir / "config.yaml"
    assert "seq_len: 256" in config.read_text()
    config.write_text(config.read_text().replace("seq_len: 256", "seq_len: 128"))
    with pytest.raises(CheckpointError, match=r"different configuration:\n  data.seq_len: checkpoint=256 now=128"):
        load_model(run_dir, "moe")


# --------------------------------------------------------------------------- divergence
def test_nan_gradient_is_never_applied_nor_saved(compose_train, tmp_path):
    trainer = make_trainer(compose_train(*TINY, "trainer.checkpoint_every=2"), tmp_path)
    param = next(trainer.model.parameters())

    def poison(grad):  # the loss stays finite; one gradient does not, at step 3
        return grad * float("nan") if trainer.step == 3 else grad

    param.register_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"gradient norm is nan .* at step 3.*first non-finite"):
        trainer.fit()
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())  # the step was not applied
    state = load_checkpoint(latest_checkpoint(tmp_path, "moe"))
    assert state["step"] == 2 and all(bool(torch.isfinite(t).all()) for t in state["model"].values())


def test_divergence_keeps_a_finite_last_checkpoint_even_with_keep_last_1(compose_train, tmp_path):
    """The issue's recipe: lr=30 without clipping, a checkpoint every step, only the last one kept."""
    cfg = compose_train(
        *TINY,
        "trainer.lr=30",
        "trainer.grad_clip=0",
        "trainer.warmup_steps=1",
        "trainer.checkpoint_every=1",
        "trainer.keep_last=1",
        "trainer.max_steps=300",
        "trainer.eval_every=1000",
    )
    with pytest.raises(TrainingDiverged, match=r"at step (\d+).*The last good checkpoint is .*step_\d+\.pt") as err:
        run_experiment(cfg, tmp_path)
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    state = load_checkpoint(latest_checkpoint(tmp_path, "moe"))
    assert state["step"] == step
    tensors = [*state["model"].values(), *(v for s in state["optimizer"]["state"].values() for v in s.values())]
    assert all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# --------------------------------------------------------------------------- concurrent writers
def test_a_second_writer_stops_at_once_naming_the_holder(compose_train, tmp_path):
    with run_dir_lock(tmp_path):
        with pytest.raises(RunDirLocked, match=rf"in use by pid {os.getpid()}"):
            run_experiment(compose_train(*TINY), tmp_path)
        assert not (tmp_path / "config.yaml").exists()  # nothing written by the refused run
    with run_dir_lock(tmp_path):  # released on exit, reusable
        pass
    assert (tmp_path / ".lock").read_text() == ""  # emptied on release: a run leaves it as it found it


# --------------------------------------------------------------------------- metrics after a crash
def test_metrics_survive_a_torn_line_a_killed_first_attempt_and_a_rerun(compose_train, tmp_path, capsys):
    cfg = compose_train(*TINY, "trainer.checkpoint_every=1000", "trainer.log_every=1")
    metrics = tmp_path / "models" / "moe" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    # A first attempt killed before its first checkpoint, whose last line was torn by the crash.
    metrics.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.9}\n{"step": 3, "lo')
    make_trainer(cfg, tmp_path).fit()
    assert f"{metrics}: dropped 1 unreadable line" in capsys.readouterr().out
    steps = [r["step"] for r in metric_records(tmp_path) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[0] == 1  # no duplicated steps
    finals = [r["step"] for r in metric_records(tmp_path) if "val_loss" in r]
    make_trainer(cfg, tmp_path).fit()  # rerunning the finished run
    assert [r["step"] for r in metric_records(tmp_path) if "val_loss" in r] == finals
    assert [r["step"] for r in metric_records(tmp_path) if "loss" in r] == steps


# --------------------------------------------------------------------------- a stalled rank
STALL_SCRIPT = """
import sys, torch
from moe.distributed import all_reduce_mean, collectives_watched, init_distributed, shutdown
ctx = init_distributed("cpu", float(sys.argv[1]))
print("ready", flush=True)
try:
    with collectives_watched(ctx):
        while True:
            all_reduce_mean(torch.ones(1), ctx)
finally:
    shutdown(ctx)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_stopped_gloo_rank_ends_the_job_within_the_timeout_naming_it():
    timeout_s = 3.0
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": "2",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", STALL_SCRIPT, str(timeout_s)],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in (0, 1)
    ]
    try:
        for proc in ranks:
            assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # both inside the all-reduce loop
        ranks[1].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        _, err = ranks[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        for proc in ranks:
            proc.kill()
            proc.communicate()
    assert ranks[0].returncode != 0
    assert re.search(r"RankStalled: rank 1 stopped answering: rank 0 waited 3 s \(trainer.dist_timeout_s\)", err), err
    # The configured timeout, plus the grace period in which the waiting ranks report (timeout / 2).
    assert timeout_s <= elapsed < timeout_s * 1.5 + 5, elapsed


# --------------------------------------------------------------------------- full disk, read-only dirs
def test_a_full_disk_while_logging_metrics_names_the_metrics_file(compose_train, tmp_path):
    trainer = make_trainer(compose_train("experiment=smoke"), tmp_path)
    metrics = tmp_path / "models" / "moe" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.symlink_to("/dev/full")
    with pytest.raises(RunDirNotWritable) as err:
        trainer.log({"step": 1, "loss": 1.0})
    assert str(metrics) in str(err.value) and "[ENOSPC]" in str(err.value)


def test_a_full_disk_during_a_checkpoint_write_is_one_clear_line(tmp_path):
    """The temporary file of the write is made a link to /dev/full: the kernel's own ENOSPC."""
    state = {"model": {"w": torch.randn(50_000)}, "step": 1}
    save_checkpoint(tmp_path, 1, state, keep_last=5)
    (tmp_path / f".step_00000002.pt.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path, 2, {**state, "step": 2}, keep_last=5)
    last_line = str(err.value).splitlines()[-1]
    assert str(tmp_path / "step_00000002.pt") in last_line and "No space left on device [ENOSPC]" in last_line
    assert "unexpected pos" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt", "step_00000001.pt.sha256"]


def test_a_read_only_checkpoints_dir_fails_before_any_work(compose_train, tmp_path, monkeypatch):
    ckpt = tmp_path / "models" / "moe" / "checkpoints"
    ckpt.mkdir(parents=True)
    real_access = os.access
    # Patched rather than chmod-ed: the tests may run as root, who writes anywhere.
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ckpt and real_access(p, mode))
    with pytest.raises(RunDirNotWritable, match=rf"cannot write into {ckpt}: permission denied"):
        run_experiment(compose_train(*TINY), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no data/, config.yaml, .lock
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "models")
    (tmp_path / "models").write_text("")  # a file where the run keeps a directory
    with pytest.raises(RunDirNotWritable, match=r"models is a file where the run keeps a directory"):
        run_experiment(compose_train(*TINY), tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_dir_is_named_in_one_line_by_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    try:
        rc, _, err = finish(moe_train(*TINY, run_dir=run_dir))
    finally:
        run_dir.chmod(0o755)
    assert rc != 0 and "Unable to configure handler" not in err
    assert error_line(err).startswith(f"moe.run_lock.RunDirNotWritable: cannot write into {run_dir}: permission denied")


# --------------------------------------------------------------------------- fewer than two domains
def test_one_domain_is_refused_by_the_analysis_and_moe_analyze_creates_nothing(compose_train, tmp_path):
    from analysis.run import analyze_run

    one = ("data.synthetic.num_domains=1",)
    with pytest.raises(ValueError, match=r"analyze=true, but the corpus has only the domain\(s\) \['syn00'\]"):
        run_experiment(compose_train(*TINY, *one, "analyze=true"), tmp_path / "refused", after_training=analyze_run)
    assert not (tmp_path / "refused" / "data").exists()  # refused before anything was written
    run = tmp_path / "run"
    run_experiment(compose_train(*TINY, *one), run)
    with pytest.raises(
        ValueError,
        match=r"has 1 domain\(s\) \['syn00'\]; analyzing domain specialization needs at "
        "least two",
    ):
        analyze_run(run)
    # moe-analyze on it fails and leaves the run as it was: no analysis/ directory, no log file.
    # (A run_dir that does not exist fails before Hydra creates anything: tests/test_cli.py.)
    before = digest(run)
    result = subprocess.run(
        [sys.executable, "-m", "analysis.cli", f"run_dir={run}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "needs at least two" in error_line(result.stderr), result.stderr[-2000:]
    assert digest(run) == before and not (run / "analysis").exists()
