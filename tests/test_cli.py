"""The Hydra apps: every config option composes, bad configs fail before any work, the CLIs run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "router", "balance", "data", "trainer", "backend", "experiment", "arm"]


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_group_option_composes(compose_train, group, option):
    extra = {
        ("router", "switch"): ["model.moe.top_k=1"],
        ("balance", "aux_free"): ["router=sigmoid"],
        ("data", "local"): ["data.local.path=/nonexistent"],
    }.get((group, option), [])
    cfg = compose_train(f"{group}={option}", *extra)
    assert cfg.model.moe.top_k <= cfg.model.moe.num_experts


@pytest.mark.parametrize(
    "override,error,match",
    [
        ("model.moe.nmu_experts=4", (ConfigCompositionException, ConfigKeyError), "nmu_experts"),
        ("model.moe.top_k=9", ValueError, r"model.moe.top_k=9 is invalid: must be <= num_experts=8"),
        ("router=expert_choicee", ConfigCompositionException, "expert_choicee"),
        ("trainer.micro_batch_size=zero", (ConfigCompositionException, ValidationError), "micro_batch_size"),
        ("balance=aux_free", ValueError, "router=sigmoid"),
        ("model.moe.capacity_factor=0", ValueError, "capacity_factor"),
        ("twin.match=[half]", ValueError, "twin.match contains 'half'"),
        ("trainer.lr=-1e-3", ValueError, r"trainer.lr=-0.001 is out of range: it must be a finite number > 0"),
        ("trainer.lr=nan", ValueError, r"trainer.lr=nan is out of range"),
        ("trainer.beta1=1.5", ValueError, r"trainer.beta1=1.5 is out of range: it must be in \[0, 1\)"),
        ("trainer.weight_decay=-1", ValueError, "trainer.weight_decay=-1"),
        ("trainer.grad_clip=-1", ValueError, "trainer.grad_clip=-1"),
        ("trainer.warmup_steps=-5", ValueError, "trainer.warmup_steps=-5"),
        ("trainer.min_lr_ratio=5", ValueError, "trainer.min_lr_ratio=5"),
        ("router.jitter=5", ValueError, r"router.jitter=5.0 is out of range"),
        # A key added with `+` is still checked against the schema, at any depth.
        (
            "+trainer.max_stepz=5",
            ValueError,
            r"unknown config key 'trainer.max_stepz' \(did you mean trainer.max_steps\?\)",
        ),
        ("+model.moe.nmu=3", ValueError, r"unknown config key 'model.moe.nmu' \(valid keys there: activation, "),
        ("+seeed=1", ValueError, r"unknown config key 'seeed' \(did you mean seed\?\)"),
        # Choices and ranges of every group, checked at composition: before any data preparation.
        ("router.kind=topkk", ValueError, r"router.kind='topkk' is unknown; allowed values: topk, "),
        ("balance.scope=global", ValueError, r"balance.scope='global' is unknown; allowed values: micro_batch, "),
        ("balance.lbl_coef=-1", ValueError, r"balance.lbl_coef=-1.0 is out of range: it must be a finite number >= 0"),
        ("balance.z_coef=nan", ValueError, r"balance.z_coef=nan is out of range"),
        ("router=sigmoid router.bias_update_rate=inf", ValueError, r"router.bias_update_rate=inf is out of range"),
        # A field of another router: refused at composition (each router kind has its own config).
        ("router.hash_seed=3", (ConfigCompositionException, ConfigKeyError), "hash_seed"),
        ("model.init_std=0", ValueError, r"model.init_std=0.0 is out of range: it must be a finite number > 0"),
        ("model.rope_theta=-1", ValueError, r"model.rope_theta=-1.0 is out of range"),
        ("seed=-1", ValueError, r"seed=-1 is out of range: it must be an integer >= 0"),
        ("trainer.threads=0", ValueError, r"trainer.threads=0 is out of range"),
        (
            "trainer.dist_timeout_s=0",
            ValueError,
            r"trainer.dist_timeout_s=0.0 is out of range: it must be a finite number "
            r"of seconds > 0",
        ),
        ("data.val_fraction=nan", ValueError, r"data.val_fraction=nan must lie strictly between 0 and 1"),
        ("data.max_upsample=0.5", ValueError, r"data.max_upsample=0.5 is out of range: it must be a number >= 1"),
        ("data.corpus_seed=-2", ValueError, r"data.corpus_seed=-2 is out of range"),
    ],
)
def test_bad_config_fails_at_composition_with_a_clear_message(compose_train, override, error, match):
    with pytest.raises(error, match=match):
        compose_train(*override.split())


def test_analyze_app_takes_a_model_name_and_a_data_group():
    """`model` is also a config group of moe-train; moe-analyze must still read model=... as a value."""
    from hydra import compose, initialize

    import analysis.cli  # noqa: F401  (registers the app's configs)

    with initialize(version_base="1.3", config_path=None):
        cfg = compose("analyze", overrides=["model=hf:allenai/OLMoE-1B-7B-0924", "data=hf", "device=cuda"])
        assert cfg.model == "hf:allenai/OLMoE-1B-7B-0924" and cfg.data.source == "hf"
        assert compose("analyze", overrides=["run_dir=/r", "model=dense_active"]).model == "dense_active"
        with pytest.raises(ConfigCompositionException):
            compose("analyze", overrides=["run_dir=/r", "data=nope"])


def test_analyze_refuses_a_wrong_run_dir_or_hf_dir_before_hydra_creates_anything(tmp_path):
    """Hydra resolves its run dir (<run_dir>/analysis) through `analyze_dir` before creating it."""
    from analysis.cli import analyze_dir

    with pytest.raises(ValueError, match=r"run_dir=.*/nonexistent does not exist"):
        analyze_dir("moe", str(tmp_path / "nonexistent"), None, "unused")
    with pytest.raises(ValueError, match=r"is not a moe-train run directory \(it has no data/manifest.json\)"):
        analyze_dir("moe", str(tmp_path), str(tmp_path / "out"), "unused")
    (tmp_path / "weights").mkdir()
    with pytest.raises(ValueError, match=r"weights is not a Hugging Face model directory \(it has no config.json\)"):
        analyze_dir(f"hf:{tmp_path / 'weights'}", None, None, "unused")
    (tmp_path / "weights" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has a model but no tokenizer"):
        analyze_dir(f"hf:{tmp_path / 'weights'}", None, None, "unused")
    with pytest.raises(ValueError, match=r"nowhere does not exist"):
        analyze_dir("hf:./nowhere", None, None, "unused")
    assert analyze_dir("hf:allenai/OLMoE-1B-7B-0924", None, None, "fallback") == "fallback"  # a Hub name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


def run(args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_train_and_analyze_cli_end_to_end(tmp_path):
    result = run(["moe.train", "experiment=smoke", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert set(table) == {"moe", "dense_active"}
    assert not (tmp_path / "analysis").exists()  # experiment=smoke: analyze=false
    result = run(
        ["analysis.cli", f"run_dir={tmp_path}", "analysis.n_permutations=20", "analysis.n_bootstrap=20"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["verdict"]["verdict"] in {"specialist", "ensemble", "inconclusive"}
    # The report states the data it rests on: documents and tokens per domain and split.
    splits = summary["data_splits"]
    assert set(splits) == {"train", "val"} and set(splits["val"]) == set(summary["domains"])
    assert all(c["documents"] >= 2 and c["tokens"] > 0 for c in splits["val"].values())
    report = (tmp_path / "analysis" / "report.md").read_text()
    assert "val split" in report and "documents" in report
    # The data's own warnings (e.g. too few validation documents) reach the summary and the report.
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert summary["data_warnings"] == manifest["warnings"]
    assert all(f"**data warning**: {w}" in report for w in manifest["warnings"])


def test_the_main_job_trains_then_analyzes_and_moe_train_alone_says_how(tmp_path):
    """`moe-train` is analysis.pipeline (train, then analyze); `python -m moe.train` trains only and
    says so when analyze=true."""
    result = run(
        [
            "moe.train",
            "experiment=smoke",
            "analyze=true",
            "trainer.max_steps=2",
            f"hydra.run.dir={tmp_path / 'train_only'}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trains and compares only; analyze this run with `moe-analyze" in result.stdout
    assert not (tmp_path / "train_only" / "analysis").exists()
    result = run(
        ["analysis.pipeline", "experiment=smoke", "analyze=true", f"hydra.run.dir={tmp_path / 'main'}"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "main" / "analysis" / "summary.json").is_file()


@pytest.mark.slow
def test_multirun_sweep(tmp_path):
    result = run(
        [
            "moe.train",
            "-m",
            "experiment=smoke",
            "balance=micro_batch,global_batch",
            "twin.match=[]",
            f"hydra.sweep.dir={tmp_path}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.rglob("comparison.json"))
    assert len(runs) == 2


def test_bad_value_on_the_command_line_exits_nonzero_before_training(tmp_path):
    result = run(["moe.train", "experiment=smoke", "model.moe.top_k=9", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert result.returncode != 0
    assert "top_k=9" in result.stderr
    assert not (tmp_path / "models").exists()
