"""The checkpoint module's own guarantees: temporary files of killed writes cleaned up, loading
that executes no code, one fingerprint that ignores what does not change the computation, write
errors named in one line. The end-to-end faults of issue 17 (kill -9, bit flips, divergence, a
second writer, refused resumes, torn metrics, stalled ranks) are in tests/test_fault_injection.py."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle

import pytest
import torch

from moe.checkpoint import (
    DIRECTORY_DIGESTS,
    CheckpointError,
    check_fingerprint,
    checkpoint_dir,
    checkpoint_files,
    file_digests,
    latest_good_checkpoint,
    load_checkpoint,
    remove_orphaned_temp_files,
    save_checkpoint,
    trajectory_fingerprint,
    verify_directory,
    write_directory_digests,
)
from moe.run_lock import RunDirNotWritable, write_error


def test_orphaned_temp_files_are_removed_and_live_ones_kept(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
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


def test_fingerprint_covers_the_computation_and_nothing_else(compose_train, tmp_path):
    """Moving the data cache or changing the upsampling warning resumes; precision does not. A
    checkpoint from before cache_dir left the fingerprint (it recorded it) still resumes."""
    base = compose_train("experiment=smoke")
    fp = trajectory_fingerprint(base, base.model, 1)
    assert "cache_dir" not in fp["data"] and "max_upsample" not in fp["data"] and fp["precision"] == "auto"
    for override in (
        "data.cache_dir=/elsewhere",
        "data.max_upsample=100",
        "trainer.dist_timeout_s=5",
        "trainer.checkpoint_every=7",
    ):
        cfg = compose_train("experiment=smoke", override)
        check_fingerprint(fp, trajectory_fingerprint(cfg, cfg.model, 1), tmp_path / "x.pt")
    older = {**fp, "data": {**fp["data"], "cache_dir": "/old/cache"}}
    check_fingerprint(older, fp, tmp_path / "x.pt")
    cfg = compose_train("experiment=smoke", "trainer.precision=bf16")
    with pytest.raises(CheckpointError, match="precision: checkpoint='auto' now='bf16'"):
        check_fingerprint(fp, trajectory_fingerprint(cfg, cfg.model, 1), tmp_path / "x.pt")


def test_write_errors_become_one_line_naming_the_path(tmp_path):
    full = write_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert isinstance(full, RunDirNotWritable) and "\n" not in str(full)
    assert str(full).startswith(f"cannot write {tmp_path}: No space left on device [ENOSPC]; free disk space")
    denied = write_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "m.jsonl")), tmp_path)
    assert str(denied).startswith(f"{tmp_path / 'm.jsonl'}: Permission denied [EACCES]; fix its permissions")
    assert write_error(FileNotFoundError(errno.ENOENT, "No such file"), tmp_path) is None  # not a write problem


def test_a_run_resumes_at_another_world_size_with_the_same_micro_batches_per_step(compose_train, tmp_path):
    """world_size x grad_accum_steps (the micro-batches of a step) must match, not each factor;
    global_batch balancing, whose counts accumulate over the micro-steps in order, needs both."""
    saved_cfg = compose_train("experiment=smoke", "trainer.grad_accum_steps=1")
    saved = trajectory_fingerprint(saved_cfg, saved_cfg.model, 4)
    for world, accum in ((2, 2), (1, 4)):
        cfg = compose_train("experiment=smoke", f"trainer.grad_accum_steps={accum}")
        check_fingerprint(saved, trajectory_fingerprint(cfg, cfg.model, world), tmp_path / "x.pt")
    cfg = compose_train("experiment=smoke", "trainer.grad_accum_steps=1")
    with pytest.raises(
        CheckpointError, match=r"micro_batches_per_step \(world_size x grad_accum_steps\): checkpoint=4 now=2"
    ):
        check_fingerprint(saved, trajectory_fingerprint(cfg, cfg.model, 2), tmp_path / "x.pt")
    global_cfg = compose_train("experiment=smoke", "balance=global_batch", "trainer.grad_accum_steps=1")
    global_saved = trajectory_fingerprint(global_cfg, global_cfg.model, 4)
    cfg = compose_train("experiment=smoke", "balance=global_batch", "trainer.grad_accum_steps=2")
    with pytest.raises(CheckpointError, match="world_size: checkpoint=4 now=2"):
        check_fingerprint(global_saved, trajectory_fingerprint(cfg, cfg.model, 2), tmp_path / "x.pt")


def test_ranks_hash_a_sharded_checkpoint_once_between_them(tmp_path):
    """Three ranks' shares of a checkpoint directory's files make the record of every file (against
    hashlib); a damaged file is found by the share that holds it alone."""
    files = {f"__{r}_0.distcp": os.urandom(1000 + r) for r in range(4)} | {".metadata": b"m", "trainer.pt": b"t"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = checkpoint_files(tmp_path)
    assert names == sorted(files)
    shares = [file_digests(tmp_path, names[rank::3]) for rank in range(3)]
    write_directory_digests(tmp_path, [line for share in reversed(shares) for line in share])
    record = (tmp_path / DIRECTORY_DIGESTS).read_text()
    assert checkpoint_files(tmp_path) == names  # the record is not a file it covers
    assert record == "".join(f"{hashlib.sha256(files[n]).hexdigest()} {len(files[n])} {n}\n" for n in sorted(files))
    (tmp_path / "__2_0.distcp").write_bytes(files["__2_0.distcp"][:-1] + b"!")
    found = []
    for rank in range(3):
        try:
            verify_directory(tmp_path, (rank, 3))
        except CheckpointError as exc:
            found.append((rank, str(exc)))
    assert len(found) == 1 and "__2_0.distcp does not match its digest" in found[0][1]
    with pytest.raises(CheckpointError, match="__2_0.distcp does not match its digest"):
        verify_directory(tmp_path)


def test_every_rank_skips_a_checkpoint_another_rank_found_damaged(tmp_path):
    """Where the ranks verify shares, `agree` hands each the problem any rank found: a checkpoint
    this rank saw no fault in is skipped for the one before, with the other rank's finding."""
    directory = checkpoint_dir(tmp_path, "moe")
    for step in (2, 4):
        save_checkpoint(directory, step, {"model": {}, "step": step}, keep_last=2)
    other_rank = iter(["rank 1: step_00000004.pt is damaged", None])

    def agree(problem):
        return problem or next(other_rank)

    with pytest.warns(UserWarning, match=r"(?s)resuming from .*step_00000002.pt.*rank 1: step_00000004.pt is damaged"):
        path, state = latest_good_checkpoint(tmp_path, "moe", digest_share=(0, 2), agree=agree)
    assert path.name == "step_00000002.pt" and state["step"] == 2
    with pytest.raises(ValueError, match="needs `agree`"):
        latest_good_checkpoint(tmp_path, "moe", digest_share=(0, 2))
