"""The ground-truth battery, small: domain-blind routers (document-clustered ones included) are
not called specialist, domain-aware ones are, and the routers draw what they claim; the batteries of
the committees, paths and probe measures run and read their planted truth."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from analysis.calibrate import render_calibration, write_calibration
from analysis.calibration import (
    COMMITTEE_COLUMNS,
    DOMAIN_AWARE,
    DOMAIN_BLIND,
    BatteryConfig,
    PathBatteryConfig,
    ProbeBatteryConfig,
    ValidationTokens,
    check_committee_targets,
    check_path_targets,
    check_probe_targets,
    check_targets,
    draw_hidden_states,
    draw_path_pair,
    draw_routing,
    gaussian_domain_information,
    parse_path_router,
    parse_probe_case,
    parse_router,
    run_battery,
    run_path_battery,
    run_probe_battery,
    summarize_battery,
    summarize_committees,
    summarize_path_battery,
    summarize_probe_battery,
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
            "battery.knockout_replicates=2",
            "paths.routers=[random,xor:1]",
            "paths.replicates=1",
            "probe.cases=[noise,domain:0.3]",
            "probe.replicates=1",
            "probe.dim=8",
            "probe.n_bootstrap=99",
            f"out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = (out / "calibration.md").read_text()
    assert "## Targets" in text and "doc:1" in text and "documents" in text
    for section in ("## Standing committees", "## Expert paths", "## Domain information in the router's input"):
        assert section in text
    assert (out / "figures" / "calibration_power.png").stat().st_size > 1000
    assert (out / "calibration" / "rows.csv").read_text().count("\n") == 1 + 3 * 2
    assert (out / "calibration" / "committee_rows.csv").read_text().count("\n") == 1 + 3 * 2
    assert (out / "calibration" / "path_rows.csv").read_text().count("\n") == 1 + 2
    assert (out / "calibration" / "probe_rows.csv").read_text().count("\n") == 1 + 2


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


# ----------------------------------------------------------------------------- committees
def test_committee_columns_in_every_replicate(tokens):
    """Committee columns ride along in each replicate without changing the verdict's numbers, and
    the committee pass alone scores the very same draws."""
    cfg = BatteryConfig(
        routers=["random", "demix"], top_k=[1], num_experts=6, replicates=2, n_permutations=49, n_bootstrap=49, seed=3
    )
    both, expected = run_battery(tokens, cfg)
    verdict_only, _ = run_battery(tokens, cfg, committees=False)
    committees_only, _ = run_battery(tokens, cfg, verdict=False)
    assert len(both) == 4
    for row in both + committees_only:
        assert set(COMMITTEE_COLUMNS) <= set(row)
        assert 0.0 <= row["committee_overlap"] <= 1.0 and 0.0 < row["committee_p"] <= 1.0
        assert row["committee_mean_size"] >= 1 and isinstance(row["committee_disjoint"], bool)
    assert not any(set(COMMITTEE_COLUMNS) & set(row) for row in verdict_only)
    assert [r["cmi_share"] for r in both] == [r["cmi_share"] for r in verdict_only]
    assert [r["committee_overlap"] for r in both] == [r["committee_overlap"] for r in committees_only]
    assert [r["nmi_plugin"] for r in both] == pytest.approx([r["nmi_plugin"] for r in committees_only])
    assert "verdict" not in committees_only[0]
    by = {r["router"]: r for r in summarize_committees(both, expected)}
    assert set(by) == {"random", "demix"}
    for key in (
        "overlap_mean",
        "null_mean_mean",
        "size_mean",
        "p_median",
        "committee_disjoint",
        "committee_disjoint_ci",
    ):
        assert key in by["random"]
    assert by["random"]["committee_disjoint"] == 0.0
    # demix: each domain's mass sits on its own experts (e mod 3), disjoint committees.
    assert by["demix"]["committee_disjoint"] == 1.0 and by["demix"]["overlap_mean"] == 0.0
    targets = check_committee_targets(list(by.values()), 0.05, 0.05)
    assert targets["max_false_disjoint"]["router"] == "random" and targets["met"]["false_disjoint"]


# ----------------------------------------------------------------------------- paths
def test_parse_path_router():
    assert parse_path_router("xor:1").truth == DOMAIN_AWARE and parse_path_router("xor:0").truth == DOMAIN_BLIND
    assert parse_path_router("hash") == parse_router("hash")
    for bad in ("xor", "xor:2", "nope"):
        with pytest.raises(ValueError, match="router"):
            parse_path_router(bad)


def test_xor_pair_codes_the_domain_while_each_layer_is_blind(tokens):
    first, second = draw_path_pair(parse_path_router("xor:1"), tokens, 4, rng=0)
    np.testing.assert_array_equal((second - first) % 4, tokens.domain)  # the pair determines the domain
    for layer in (first, second):  # each layer alone: about uniform in every domain
        for d in range(3):
            share = np.bincount(layer[tokens.domain == d], minlength=4) / np.sum(tokens.domain == d)
            assert np.abs(share - 0.25).max() < 0.03
    a, b = draw_path_pair(parse_path_router("hash"), tokens, 4, rng=0)
    assert not np.array_equal(a, b)  # two hash layers, each with its own hash function
    for t in np.unique(tokens.token)[:10]:
        assert np.unique(b[tokens.token == t]).size == 1


def test_path_battery_calls_the_xor_pair_and_not_random(tokens):
    cfg = BatteryConfig(num_experts=4, n_permutations=49, n_bootstrap=49, seed=2)
    rows, expected = run_path_battery(tokens, PathBatteryConfig(routers=["random", "xor:1"], replicates=2), cfg)
    assert len(rows) == 4
    summary = {s["router"]: s for s in summarize_path_battery(rows, expected)}
    assert summary["xor:1"][f"verdict_{SPECIALIST}"] == 1.0
    assert summary["xor:1"]["layer_nmi_specialist"] == 0.0  # no layer alone is called specialist
    assert expected["xor:1"]["path_nmi"] == pytest.approx(1.0) and expected["xor:1"]["layer_nmi"] < 0.01
    assert summary["random"][f"verdict_{SPECIALIST}"] == 0.0
    assert summary["random"][f"verdict_{ENSEMBLE}"] == 1.0
    targets = check_path_targets(list(summary.values()), 0.05, 0.05)
    assert targets["met"]["false_specialist"] and targets["xor"] == {"xor:1": 1.0}
    again, _ = run_path_battery(tokens, PathBatteryConfig(routers=["random", "xor:1"], replicates=2), cfg)
    assert [r["heldout_share"] for r in again] == [r["heldout_share"] for r in rows]


# ----------------------------------------------------------------------------- probe
def test_parse_probe_case():
    assert parse_probe_case("noise").truth == DOMAIN_BLIND and parse_probe_case("doc:1").truth == DOMAIN_BLIND
    assert parse_probe_case("domain:0.1").truth == DOMAIN_AWARE and parse_probe_case("domain:0").truth == DOMAIN_BLIND
    assert parse_probe_case("domain_doc:0.2").name == "domain_doc:0.2"
    for bad in ("noise:1", "doc", "domain:-1", "domain:x", "hash"):
        with pytest.raises(ValueError, match="probe case"):
            parse_probe_case(bad)


def test_gaussian_domain_information():
    rng = np.random.default_rng(0)
    domain = np.repeat(np.arange(2), 2000)
    x = rng.standard_normal((domain.size, 3))
    assert gaussian_domain_information(x, domain, np.zeros((2, 3)), 1.0) == pytest.approx(0.0, abs=1e-12)
    far = np.array([[-20.0, 0, 0], [20.0, 0, 0]])
    assert gaussian_domain_information(x + far[domain], domain, far, 1.0) == pytest.approx(1.0, abs=1e-6)


def test_probe_battery_noise_claims_nothing(tokens):
    cfg = BatteryConfig(seed=4)
    probe = ProbeBatteryConfig(cases=["noise", "doc:1", "domain:0.5"], dim=8, replicates=2, n_bootstrap=199)
    rows = run_probe_battery(tokens, probe, cfg)
    assert len(rows) == 6
    by = {s["case"]: s for s in summarize_probe_battery(rows)}
    for blind in ("noise", "doc:1"):
        assert by[blind]["positive"] == 0.0 and by[blind]["truth_bits_mean"] == 0.0
        assert by[blind]["bits_mean"] < 0.01
    assert by["domain:0.5"]["positive"] == 1.0 and by["domain:0.5"]["truth_bits_mean"] > 0.1
    assert by["domain:0.5"]["bits_mean"] <= by["domain:0.5"]["truth_bits_mean"] + 0.05
    targets = check_probe_targets(list(by.values()), 0.05)
    assert targets["met"]["false_positive"] and targets["power_80_at_bits"] == pytest.approx(
        by["domain:0.5"]["truth_bits_mean"]
    )
    x, truth = draw_hidden_states(parse_probe_case("doc:1"), tokens, 4, rng=0)
    assert x.shape == (tokens.size, 4) and x.dtype == np.float32 and truth == 0.0
    for m in np.unique(tokens.doc)[:3]:  # one offset per document: its tokens share a mean far from 0
        assert np.abs(x[tokens.doc == m].mean(axis=0)).max() > 0.05


# ----------------------------------------------------------------------------- the report
def test_write_calibration_keeps_the_parts_that_did_not_run(tokens, tmp_path):
    """A run of some batteries into a directory that holds others' results keeps theirs: their
    numbers, their provenance and their sections."""
    cfg = BatteryConfig(
        routers=["random", "domain:0.5"], top_k=[1], num_experts=6, replicates=2, n_permutations=29, n_bootstrap=29
    )
    rows, expected = run_battery(tokens, cfg, committees=False)
    cells = summarize_battery(rows, expected)
    setup = {
        "command": "first",
        "commit": "abc",
        "date": "d",
        "seconds": 1.0,
        "workers": 1,
        "data": "test",
        "validation": tokens.counts(),
        "battery": {**cfg.__dict__, "thresholds": VerdictThresholds().__dict__},
    }
    first = {"setup": setup, "targets": check_targets(cells, VerdictThresholds(), 0.05), "routers": cells}
    write_calibration(tmp_path, first, {"rows.csv": rows})
    comm_rows, comm_expected = run_battery(tokens, cfg, verdict=False)
    comm = summarize_committees(comm_rows, comm_expected)
    second = {
        "committees": {
            "setup": {**setup, "command": "second", "note": "a note"},
            "targets": check_committee_targets(comm, 0.05, 0.05),
            "cells": comm,
        }
    }
    md = write_calibration(tmp_path, second, {"committee_rows.csv": comm_rows})
    text = md.read_text()
    assert "- routers (the verdict): `first` on commit `abc` (d, 1 s on 1 worker(s))" in text
    assert "- standing committees (1 s): `second` on commit `abc` (d, 1 worker(s); a note)" in text
    assert "## Domain-aware routers" in text and "## Standing committees" in text
    merged = json.loads((tmp_path / "calibration" / "summary.json").read_text())
    assert merged["routers"] == json.loads(json.dumps(cells))
    assert set(merged) == {"setup", "targets", "routers", "committees"}
    assert render_calibration(merged) == text
    assert (tmp_path / "calibration" / "rows.csv").is_file() and (
        tmp_path / "calibration" / "committee_rows.csv"
    ).is_file()
