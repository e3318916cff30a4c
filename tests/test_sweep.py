"""The specialization sweep: arms compose to what they say, MoE jobs pair with the twins of their
(data, seed), and the smoke sweep runs end to end into a table whose numbers are the jobs' own."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from analysis.run import analyze_run, twin_mismatches
from analysis.runs import load_sweep
from analysis.sweep import (
    arm_of,
    corpus_of,
    data_mismatches,
    loss_contrasts,
    loss_gaps,
    pair_twins,
    paired_contrasts,
    seed_interval,
)
from moe.config import as_plain_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
ARMS = sorted(p.stem for p in (CONF / "arm").glob("*.yaml"))


@pytest.mark.parametrize("arm", ARMS)
def test_each_arm_composes_to_the_arm_it_names(compose_train, arm):
    cfg = compose_train("experiment=specialization", f"arm={arm}")
    assert arm_of(as_plain_dict(cfg)) == arm
    # The MoE arms leave the twins to the dense arm; the dense arm trains both and no MoE.
    assert (cfg.twin.only, list(cfg.twin.match)) == ((True, ["active", "total"]) if arm == "dense" else (False, []))


def test_the_sweep_covers_scopes_controls_and_twins_on_two_corpora():
    params = OmegaConf.load(CONF / "experiment" / "specialization.yaml").hydra.sweeper.params
    assert sorted(params.arm.split(",")) == ARMS
    assert sorted(params.data.split(",")) == ["builtin", "planted"]
    assert len(params.seed.split(",")) == 5


def test_the_positive_and_context_controls_route_as_they_say(compose_train):
    assert compose_train("experiment=specialization", "arm=domain").router.kind == "domain"
    assert compose_train("experiment=specialization", "arm=prev_hash").router.kind == "prev_hash"


def test_twins_alone_need_twins(compose_train):
    with pytest.raises(ValueError, match="twin.only=true .* non-empty twin.match"):
        compose_train("twin.only=true", "twin.match=[]")


def test_corpus_names(compose_train):
    assert corpus_of(as_plain_dict(compose_train("data=builtin"))) == "builtin"
    assert corpus_of(as_plain_dict(compose_train("data=planted"))) == "synthetic(overlap=0.5)"


def test_seed_interval_is_the_student_t_interval():
    iv = seed_interval([1.0, 2.0, 3.0], confidence=0.95)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} from a table; sample sd = 1
    assert iv["n"] == 3 and iv["mean"] == pytest.approx(2.0)
    assert (iv["low"], iv["high"]) == pytest.approx((2.0 - half, 2.0 + half))
    one = seed_interval([0.5, float("nan")])
    assert one["n"] == 1 and one["mean"] == 0.5 and math.isnan(one["low"]) and math.isnan(one["high"])
    assert seed_interval([])["n"] == 0


def test_bonferroni_interval_widens_to_the_family_level():
    values = [1.0, 2.0, 3.0, 2.5]
    iv = seed_interval(values, confidence=0.95, family=5)
    ref = seed_interval(values, confidence=1 - 0.05 / 5)  # the family-wise level, computed directly
    assert (iv["adj_low"], iv["adj_high"], iv["family"]) == pytest.approx((ref["low"], ref["high"], 5))
    assert iv["adj_low"] < iv["low"] and iv["adj_high"] > iv["high"]
    assert "adj_low" not in seed_interval(values)


def test_loss_contrasts_pair_each_arm_with_the_baseline_of_its_seed():
    rows = [
        {"corpus": "c", "arm": arm, "seed": s, "layer": layer, "loss_moe_all": base + delta}
        for s, base in ((0, 3.0), (1, 4.0), (2, 5.0))
        for layer in (0, 1)
        for arm, delta in (("hash", 0.0), ("micro_batch", 0.1), ("global_batch", -0.2))
    ]
    deltas = {d["arm"]: d for d in loss_contrasts(rows, baseline="hash")}
    assert set(deltas) == {"micro_batch", "global_batch"}
    assert deltas["micro_batch"]["delta"]["mean"] == pytest.approx(0.1)
    assert deltas["global_batch"]["delta"]["mean"] == pytest.approx(-0.2)
    assert deltas["global_batch"]["delta"]["n"] == 3 and deltas["global_batch"]["delta"]["family"] == 2


def test_loss_gaps_are_paired_by_seed():
    # Two seeds whose twins differ a lot but whose MoE is always 0.1 better: the paired gap has no spread.
    rows = [
        {
            "path": f"run{s}",
            "corpus": "c",
            "arm": "global_batch",
            "seed": s,
            "layer": 0,
            "loss_moe_all": base - 0.1,
            "loss_dense_active_all": base,
            "loss_dense_total_all": base - 0.2,
        }
        for s, base in ((0, 3.0), (1, 5.0))
    ]
    rows.append({**rows[0], "layer": 1})  # a second layer of the same run must not count twice
    (gap,) = loss_gaps(rows)
    assert gap["gap_dense_active"]["all"]["n"] == 2
    assert gap["gap_dense_active"]["all"]["mean"] == pytest.approx(-0.1)
    assert gap["gap_dense_active"]["all"]["high"] == pytest.approx(-0.1)
    assert gap["gap_dense_total"]["all"]["mean"] == pytest.approx(0.1)
    assert gap["loss_moe"]["all"]["mean"] == pytest.approx(3.9)


def test_contrasts_pair_arms_by_seed():
    # Seeds differ a lot; global_batch is always 0.05 above micro_batch: the paired interval is exact.
    rows = [
        {
            "corpus": "c",
            "arm": arm,
            "layer": 0,
            "seed": s,
            "nmi": base + (0.05 if arm == "global_batch" else 0),
            "cmi_excess": 0.0,
            "ko_selectivity": 0.0,
        }
        for s, base in ((0, 0.1), (1, 0.4), (2, 0.7))
        for arm in ("micro_batch", "global_batch")
    ]
    rows.append({**rows[-1], "seed": 3})  # no micro_batch partner: left out
    (c,) = paired_contrasts(rows)
    assert (c["arm"], c["baseline"], c["seeds"]) == ("global_batch", "micro_batch", [0, 1, 2])
    assert c["nmi"]["mean"] == pytest.approx(0.05) and c["nmi"]["high"] - c["nmi"]["low"] == pytest.approx(0, abs=1e-12)


def _run(args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """The smoke sweep (dense twins + one MoE arm, one seed) for seeds 0 and 1, trained once."""
    root = tmp_path_factory.mktemp("sweep")
    result = _run(["moe.train", "-m", "experiment=specialization_smoke", "seed=0,1", f"hydra.sweep.dir={root}"], root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_pairing_matches_data_stream_and_seed(smoke_sweep):
    sweep = load_sweep(smoke_sweep)
    assert sorted(arm_of(r.config) for r in sweep.runs) == ["dense", "dense", "global_batch", "global_batch"]
    for run in sweep.runs:
        assert set(run.comparison) == ({"dense_active", "dense_total"} if arm_of(run.config) == "dense" else {"moe"})
    pairs = pair_twins(sweep.runs)
    assert len(pairs) == 2
    by_path = {r.path: r for r in sweep.runs}
    for moe_path, dense in pairs.items():
        assert by_path[moe_path].config["seed"] == dense.config["seed"]
    moe0 = next(p for p in pairs if by_path[p].config["seed"] == 0)
    dense1 = next(d for d in pairs.values() if d.config["seed"] == 1)
    problems = twin_mismatches(moe0, dense1.path)
    assert any("stream_fingerprint" in p for p in problems)
    with pytest.raises(ValueError, match="not the twins"):
        analyze_run(moe0, twin_run=dense1.path)


def test_two_dense_jobs_for_the_same_twins_are_an_error(smoke_sweep, tmp_path):
    dense = next(r for r in load_sweep(smoke_sweep).runs if arm_of(r.config) == "dense")
    shutil.copytree(dense.path, tmp_path / "a")
    shutil.copytree(dense.path, tmp_path / "b")
    with pytest.raises(ValueError, match="trained the same twins"):
        pair_twins(load_sweep(tmp_path).runs)


def test_moe_sweep_cli_analyzes_and_aggregates(smoke_sweep):
    result = _run(
        [
            "analysis.sweep",
            f"sweep_dir={smoke_sweep}",
            "analysis.n_permutations=20",
            "analysis.n_bootstrap=20",
            "analysis.knockout_tokens=512",
            "analysis.probe_tokens=256",
            "trajectory_arms=[global_batch]",
        ],
        smoke_sweep,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = smoke_sweep / "summary"
    sweep = load_sweep(smoke_sweep)
    moe_runs = [r for r in sweep.runs if arm_of(r.config) == "global_batch"]
    assert all(r.summary is not None for r in moe_runs)
    # Each MoE was analyzed with its own seed's twin as the knockout control.
    for run in moe_runs:
        assert run.summary["knockout"]["dense_base_loss"] is not None

    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    n_layers = moe_runs[0].summary["model"]["num_moe_layers"]
    assert len(rows) == len(moe_runs) * n_layers
    dense_by_seed = {r.config["seed"]: r for r in sweep.runs if arm_of(r.config) == "dense"}
    for row in rows:
        run = next(r for r in moe_runs if str(r.path) == row["path"])
        twin = dense_by_seed[run.config["seed"]].comparison
        assert float(row["loss_moe_all"]) == pytest.approx(run.comparison["moe"]["val_loss"]["all"])
        assert float(row["loss_gap"]) == pytest.approx(
            run.comparison["moe"]["val_loss"]["all"] - twin["dense_active"]["val_loss"]["all"]
        )
        layer = run.summary["layers"][int(row["layer"])]
        assert float(row["nmi"]) == pytest.approx(layer["measures"]["nmi"]["value"])
        assert float(row["cmi_high"]) == pytest.approx(layer["measures"]["cmi"]["ci_high"])

    aggregate = json.loads((out / "aggregate.json").read_text())
    first = next(m for m in aggregate["measures"] if m["layer"] == 0)
    values = [float(r["nmi"]) for r in rows if r["layer"] == "0"]
    assert first["nmi"]["n"] == 2 and first["nmi"]["mean"] == pytest.approx(sum(values) / 2)
    text = (out / "results.md").read_text()
    assert "| synthetic(overlap=0.5) | global_batch | 0 |" in text
    for name in (
        "measures_by_arm",
        "seeds_synthetic_overlap_0.5",
        "trajectory_synthetic_overlap_0.5_global_batch_seed0",
    ):
        assert (out / "figures" / f"{name}.png").stat().st_size > 10_000
    # Specialization over training: seed 0's kept checkpoints (steps 2, 4, 6), saturation 1 at the last.
    (curve,) = aggregate["trajectories"]
    assert [p["step"] for p in curve["points"]] == [2, 4, 6]
    assert all(layer["saturation"] == pytest.approx(1.0) for layer in curve["points"][-1]["layers"])
    tokens_per_step = 4 * 2 * run.config["data"]["seq_len"]  # micro-batch 4 x 2 accumulation steps
    assert [p["tokens_seen"] for p in curve["points"]] == [
        2 * tokens_per_step,
        4 * tokens_per_step,
        6 * tokens_per_step,
    ]
    # The published anchors sit in the same table as the sweep's arms.
    assert "| OLMoE-1B-7B | 15 | top-8 of 64 | 0.443 | 0.216 |" in text

    # A second call reuses the analyses (no re-analysis) and rewrites the same table.
    again = _run(["analysis.sweep", f"sweep_dir={smoke_sweep}", "trajectory_arms=[global_batch]"], smoke_sweep)
    assert again.returncode == 0 and "analyzing" not in again.stdout and "over training" not in again.stdout
    assert (out / "results.md").read_text() == text


def test_jobs_of_one_corpus_and_seed_on_different_data_are_refused(smoke_sweep, tmp_path):
    for run in load_sweep(smoke_sweep).runs:
        shutil.copytree(run.path, tmp_path / run.name, ignore=shutil.ignore_patterns("models", "analysis"))
    assert data_mismatches(load_sweep(tmp_path).runs) == []
    odd = next(p for p in tmp_path.iterdir() if "global_batch" in p.name and "seed=0" in p.name)
    manifest = json.loads((odd / "data" / "manifest.json").read_text())
    (odd / "data" / "manifest.json").write_text(json.dumps({**manifest, "stream_fingerprint": "changed"}))
    (problem,) = data_mismatches(load_sweep(tmp_path).runs)
    assert problem.startswith("synthetic(overlap=0.5), seed 0:") and odd.name in problem


def test_moe_sweep_without_a_sweep_dir_names_it(tmp_path):
    result = _run(["analysis.sweep"], tmp_path)
    assert result.returncode != 0 and "sweep_dir" in result.stderr
