"""The ground-truth battery, small: domain-blind routers (document-clustered ones included) are
not called specialist, domain-aware ones are, and the routers draw what they claim."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from analysis.calibration import (
    DOMAIN_AWARE,
    DOMAIN_BLIND,
    BatteryConfig,
    ValidationTokens,
    check_targets,
    draw_routing,
    parse_router,
    run_battery,
    summarize_battery,
    wilson_interval,
)
from analysis.verdict import ENSEMBLE, INCONCLUSIVE, SPECIALIST, VerdictThresholds


def make_tokens(
    seed: int = 0, n_docs: int = 60, doc_len: int = 256, seq_len: int = 128, v: int = 120, n_domains: int = 3
) -> ValidationTokens:
    """Documents of one domain each, over overlapping per-domain vocabularies, packed in rows."""
    rng = np.random.default_rng(seed)
    doc_domain = np.arange(n_docs) % n_domains
    domain = np.repeat(doc_domain, doc_len)
    doc = np.repeat(np.arange(n_docs), doc_len)
    token = (domain * (v // n_domains) + rng.integers(0, v // n_domains + 20, domain.size)) % v
    rows = domain.size // seq_len
    return ValidationTokens.from_arrays(
        token.reshape(rows, seq_len),
        domain.reshape(rows, seq_len),
        doc.reshape(rows, seq_len),
        [f"d{i}" for i in range(n_domains)],
    )


@pytest.fixture(scope="module")
def tokens() -> ValidationTokens:
    return make_tokens()


def test_parse_router():
    assert parse_router("hash") == parse_router("hash")
    assert parse_router("hash").truth == DOMAIN_BLIND and parse_router("demix").truth == DOMAIN_AWARE
    assert parse_router("doc:0.5").truth == DOMAIN_BLIND and parse_router("doc:0.5").name == "doc:0.5"
    assert parse_router("domain:0.2").truth == DOMAIN_AWARE and parse_router("domain:0").truth == DOMAIN_BLIND
    for bad in ("nope", "doc", "domain:2", "hash:0.1", "domain:x"):
        with pytest.raises(ValueError, match="router"):
            parse_router(bad)


def test_routers_draw_what_they_claim(tokens):
    e, k = 6, 2
    for name in (
        "random",
        "hash",
        "bigram",
        "position",
        "doc_position",
        "doc_length",
        "doc:0.5",
        "mix",
        "domain:0.3",
        "demix",
    ):
        experts = draw_routing(parse_router(name), tokens, e, k, rng=0)
        assert experts.shape == (tokens.size, k) and experts.min() >= 0 and experts.max() < e
        assert (experts[:, 0] != experts[:, 1]).all(), name  # distinct experts per token
        np.testing.assert_array_equal(experts, draw_routing(parse_router(name), tokens, e, k, rng=0))
    hashed = draw_routing(parse_router("hash"), tokens, e, 1, rng=1)[:, 0]
    for t in np.unique(tokens.token)[:20]:  # a function of the token id
        assert np.unique(hashed[tokens.token == t]).size == 1
    doc = draw_routing(parse_router("doc:1"), tokens, e, 1, rng=1)[:, 0]
    for m in np.unique(tokens.doc)[:10]:  # a function of the document
        assert np.unique(doc[tokens.doc == m]).size == 1
    demix = draw_routing(parse_router("demix"), tokens, e, 2, rng=1)
    assert ((demix % 3) == tokens.domain[:, None]).all()  # domain d's own experts: e mod D = d


def test_battery_small(tokens):
    """A few replicates: the domain-blind routers (document-keyed at full strength, where the old
    within-token null said specialist in every run) get no specialist call, the domain-aware ones
    always do."""
    cfg = BatteryConfig(
        routers=["random", "hash", "doc:1", "doc:0.5", "domain:0.5", "demix"],
        top_k=[1, 2],
        num_experts=6,
        replicates=4,
        n_permutations=99,
        n_bootstrap=99,
        seed=1,
    )
    rows, expected = run_battery(tokens, cfg)
    assert len(rows) == 6 * 2 * 4
    summary = summarize_battery(rows, expected)
    by = {(s["router"], s["top_k"]): s for s in summary}
    for k in (1, 2):
        for blind in ("random", "hash", "doc:1", "doc:0.5"):
            assert by[(blind, k)][f"verdict_{SPECIALIST}"] == 0.0, (blind, k)
            assert by[(blind, k)][f"cmi_{SPECIALIST}"] == 0.0, (blind, k)
        assert by[("random", k)][f"verdict_{ENSEMBLE}"] == 1.0
        assert by[("demix", k)][f"verdict_{SPECIALIST}"] == 1.0 and by[("demix", k)]["expected_nmi"] > 0.9
        assert by[("domain:0.5", k)][f"verdict_{SPECIALIST}"] == 1.0
        assert by[("domain:0.5", k)][f"verdict_{ENSEMBLE}"] == 0.0
    targets = check_targets(summary, VerdictThresholds(), power_at=0.05)
    assert targets["met"]["false_specialist"] and targets["met"]["false_ensemble"]
    # Deterministic given the seed.
    again, _ = run_battery(tokens, cfg)
    assert [r["cmi_share"] for r in again] == [r["cmi_share"] for r in rows]


def test_wilson_interval():
    low, high = wilson_interval(0, 100)
    assert low == pytest.approx(0.0, abs=1e-12) and 0.03 < high < 0.04
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and high - low == pytest.approx(2 * 1.96 * 0.05, rel=0.05)


@pytest.mark.slow
def test_moe_calibrate_cli(tmp_path):
    out = tmp_path / "cal"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "analysis.calibrate",
            "data=synthetic",
            "data.synthetic.tokens_per_domain=12000",
            "data.val_tokens_per_domain=4096",
            "data.seq_len=64",
            f"data.cache_dir={tmp_path / 'cache'}",
            "battery.routers=[random,doc:1,demix]",
            "battery.top_k=[1]",
            "battery.replicates=2",
            "battery.n_permutations=49",
            "battery.n_bootstrap=49",
            f"out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = (out / "calibration.md").read_text()
    assert "## Targets" in text and "doc:1" in text and "documents" in text
    assert (out / "figures" / "calibration_power.png").stat().st_size > 1000
    assert (out / "calibration" / "rows.csv").read_text().count("\n") == 1 + 3 * 2


def test_a_replicate_without_a_measurable_cmi_abstains():
    """Every token id occurs once, so no context reaches the held-out estimate's minimum support:
    the cmi criterion is inconclusive (as in moe-analyze) and the battery goes on (it raised
    AttributeError on the missing estimate)."""
    n_docs, doc_len, n_domains = 12, 32, 2
    n = n_docs * doc_len
    domain = np.repeat(np.arange(n_docs) % n_domains, doc_len)
    doc = np.repeat(np.arange(n_docs), doc_len)
    tokens = ValidationTokens.from_arrays(
        np.arange(n).reshape(-1, doc_len), domain.reshape(-1, doc_len), doc.reshape(-1, doc_len), ["a", "b"]
    )
    cfg = BatteryConfig(routers=["hash"], top_k=[1], num_experts=4, replicates=2, n_permutations=19, n_bootstrap=19)
    rows, expected = run_battery(tokens, cfg)
    assert [r["cmi"] for r in rows] == [INCONCLUSIVE, INCONCLUSIVE]
    assert all(np.isnan(r["cmi_share"]) for r in rows)
    assert np.isnan(summarize_battery(rows, expected)[0]["cmi_share_mean"])
