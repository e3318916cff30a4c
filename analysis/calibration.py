"""The verdict on routers whose truth is known: false-specialist rates and power.

A routing record needs no trained model: any rule that maps a validation token (with its id,
previous token, position, document and domain) to K experts is a router. This module draws such
records over real validation data from rules whose truth is known and runs the package's own
routing criteria and combined verdict (`analysis.measures.routing_evidence`,
`analysis.verdict`) on each, over many replicates (fresh random draws of the rule):

domain-blind (truth: not specialist)
    random        K distinct experts uniformly at random per token
    hash          keyed on the token id (a fixed random expert ranking per token id)
    bigram        keyed on the previous token (context-using, domain-blind)
    position      keyed on the position in the sequence (16 buckets)
    doc_position  keyed on the position inside the document as a causal router sees it (tokens since
                  the document began in this sequence, log2 buckets); domains differ in document
                  length, so late positions are rarer in short-document domains
    doc_length    keyed on the document's length (8 quantile buckets); domains differ in length,
                  so this rule carries domain information through a document property
    doc:a         with probability a the document's own experts (drawn per document, independent
                  of its domain: a topic/style preference), else hash
    mix           each token picks hash, doc:1, position or bigram at random
domain-aware (truth: specialist when s > 0)
    domain:s      with probability s the token goes to its domain's own experts (domain d owns the
                  experts e with e mod D = d), else uniformly random
    domain_hash:s the same with the hash rule as the domain-blind part
    demix         every token to its domain's own experts (DEMix-style oracle, = domain:1)

Every replicate gets the table of rates it enters into (`summarize_battery`), and the domain-aware
ones their "true" NMI: that of the mean domain x expert table over the replicates (the expectation
the draws scatter around).

The measures beyond the verdict (issue 22) go through the same kind of battery:

committees (`judge_committees`, in each replicate of `run_battery`)
    `analysis.committees.committee_evidence` on the replicate's document table; the committee call
    "disjoint" = overlap significantly below its document-permutation null (p < alpha). Its rate on
    domain-blind routers is the false-disjoint rate, on domain-aware ones its power.
paths (`run_path_battery`)
    two layers per replicate, each drawn from the same rule with its own randomness (top-1), or the
    planted pair `xor:s` whose layers are each exactly domain-blind while, with probability s, the
    second is the first shifted by the domain (mod E), so the pair codes the domain;
    `analysis.paths.path_information` (top1, held-out I(D;path|C) on) judged by the layer verdict's
    rule (`analysis.verdict.judge_layer` on the path's NMI excess and held-out share).
probe (`run_probe_battery`)
    synthetic router inputs x [N, D] over the validation tokens with known truth
    (`draw_hidden_states`): noise, per-document offsets only (domain-blind document quirks), a
    domain mean shift, or both; `analysis.probe_information.probe_domain_information` claims
    information when p < alpha.

Legend: N tokens, K top-k, E experts, D domains (D model dim in `draw_hidden_states`), M documents,
S sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analysis.committees import committee_evidence
from analysis.heldout import HeldoutInformation
from analysis.information import contingency, doc_expert_counts, entropy, normalized_mutual_information
from analysis.measures import previous_tokens, routing_evidence
from analysis.paths import path_information
from analysis.probe_information import probe_domain_information
from analysis.records import LayerRecords, RoutingRecords
from analysis.statistics import SpecializationResult
from analysis.verdict import (
    ENSEMBLE,
    SPECIALIST,
    LayerEvidence,
    LayerVerdict,
    VerdictThresholds,
    judge_knockout,
    judge_layer,
    judge_nmi,
)

__all__ = [
    "DEFAULT_ROUTERS",
    "DOMAIN_AWARE",
    "DOMAIN_BLIND",
    "PATH_ROUTERS",
    "PROBE_CASES",
    "BatteryConfig",
    "PathBatteryConfig",
    "ProbeBatteryConfig",
    "RouterSpec",
    "ValidationTokens",
    "check_committee_targets",
    "check_path_targets",
    "check_probe_targets",
    "check_targets",
    "draw_hidden_states",
    "draw_path_pair",
    "draw_routing",
    "gaussian_domain_information",
    "judge_committees",
    "judge_path_replicate",
    "judge_replicate",
    "knockout_battery",
    "parse_path_router",
    "parse_probe_case",
    "parse_router",
    "path_records",
    "run_battery",
    "run_path_battery",
    "run_probe_battery",
    "summarize_battery",
    "summarize_committees",
    "summarize_path_battery",
    "summarize_probe_battery",
    "wilson_interval",
]

DOMAIN_BLIND, DOMAIN_AWARE = "domain-blind", "domain-aware"


@dataclass(frozen=True)
class ValidationTokens:
    """The labels of every validation token, [N] int64 each, in stream order (sequence by
    sequence). prev_token is -1 at the first position of a sequence; doc_length counts the
    document's tokens in this table."""

    token: np.ndarray
    prev_token: np.ndarray
    domain: np.ndarray
    doc: np.ndarray
    position: np.ndarray
    domains: tuple[str, ...]
    seq_len: int

    @property
    def doc_position(self) -> np.ndarray:
        """[N] tokens since the document began in this sequence (0 at a document's first token, or
        at the sequence start for a document that began in an earlier sequence)."""
        n = self.token.size
        start = np.ones(n, dtype=bool)
        start[1:] = (self.doc[1:] != self.doc[:-1]) | (self.position[1:] == 0)
        idx = np.arange(n)
        return idx - np.maximum.accumulate(np.where(start, idx, 0))

    @property
    def size(self) -> int:
        return int(self.token.size)

    @property
    def doc_length(self) -> np.ndarray:
        _, inv, counts = np.unique(self.doc, return_inverse=True, return_counts=True)
        return counts[inv.reshape(-1)]

    def counts(self) -> dict[str, dict[str, int]]:
        """{domain: {"tokens": n, "documents": m}} of this table."""
        out = {}
        for i, name in enumerate(self.domains):
            mask = self.domain == i
            out[name] = {"tokens": int(mask.sum()), "documents": int(np.unique(self.doc[mask]).size)}
        return out

    @classmethod
    def from_arrays(
        cls, tokens_BS: np.ndarray, domain_BS: np.ndarray, doc_BS: np.ndarray, domains: Sequence[str]
    ) -> ValidationTokens:
        """From sequences [B, S] of token ids, domain ids and document ids."""
        t = np.asarray(tokens_BS, dtype=np.int64)
        if t.ndim != 2 or np.shape(domain_BS) != t.shape or np.shape(doc_BS) != t.shape:
            raise ValueError(
                f"tokens, domain and doc must all be [B, S], got {t.shape}, {np.shape(domain_BS)}, {np.shape(doc_BS)}"
            )
        pos = np.broadcast_to(np.arange(t.shape[1], dtype=np.int64), t.shape).ravel()
        return cls(
            t.ravel(),
            previous_tokens(t.ravel(), pos),
            np.asarray(domain_BS, dtype=np.int64).ravel(),
            np.asarray(doc_BS, dtype=np.int64).ravel(),
            pos.copy(),
            tuple(domains),
            int(t.shape[1]),
        )

    @classmethod
    def from_batches(cls, batches: Iterable[Any], domains: Sequence[str]) -> ValidationTokens:
        """From `moe.data.batch.Batch`es (tokens, domain, doc [B, S] tensors)."""
        batches = list(batches)
        if not batches:
            raise ValueError("no validation batches")
        cat = lambda name: np.concatenate([getattr(b, name).cpu().numpy() for b in batches])  # noqa: E731
        return cls.from_arrays(cat("tokens"), cat("domain"), cat("doc"), domains)


# ----------------------------------------------------------------------------- routers
@dataclass(frozen=True)
class RouterSpec:
    """A router with known truth: `kind` (module docstring), `strength` (a or s; None for the
    fixed rules), `truth` DOMAIN_BLIND or DOMAIN_AWARE."""

    kind: str
    strength: float | None
    truth: str

    @property
    def name(self) -> str:
        return self.kind if self.strength is None else f"{self.kind}:{self.strength:g}"


_FIXED = {"random", "hash", "bigram", "position", "doc_position", "doc_length", "mix", "demix"}
_GRADED = {"doc", "domain", "domain_hash"}


def parse_router(text: str) -> RouterSpec:
    """`"hash"`, `"doc:0.5"`, `"domain:0.1"`, ... -> RouterSpec (kinds in the module docstring)."""
    kind, _, arg = str(text).partition(":")
    if kind in _FIXED and not arg:
        truth = DOMAIN_AWARE if kind == "demix" else DOMAIN_BLIND
        return RouterSpec(kind, None, truth)
    if kind in _GRADED and arg:
        try:
            s = float(arg)
        except ValueError:
            s = float("nan")
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"router {text!r}: the strength after ':' must be a number in [0, 1]")
        truth = DOMAIN_BLIND if kind == "doc" or s == 0.0 else DOMAIN_AWARE
        return RouterSpec(kind, s, truth)
    raise ValueError(
        f"unknown calibration router {text!r}; use one of {sorted(_FIXED)} or "
        f"{sorted(k + ':<strength in [0, 1]>' for k in _GRADED)}"
    )


def _keyed(key: np.ndarray, n_experts: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """[N, K] distinct experts: a fresh random expert ranking per distinct key, its top K."""
    _, inv = np.unique(key, return_inverse=True)
    scores = rng.random((int(inv.max()) + 1, n_experts))
    return np.argsort(scores, axis=1)[:, :top_k][inv.reshape(-1)]


def _random(n: int, n_experts: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    return np.argsort(rng.random((n, n_experts)), axis=1)[:, :top_k]


def _pick(use: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(use[:, None], a, b)


def _own_experts(tokens: ValidationTokens, n_experts: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """[N, K]: each token's domain's own experts (e mod D = d), ranked by a random ranking per token
    id; beyond the domain's |S_d| experts the remaining slots are filled by the token's hash."""
    n_dom = len(tokens.domains)
    if n_experts < n_dom:
        raise ValueError(f"domain-aware routers need at least one expert per domain: E={n_experts} < D={n_dom}")
    own = np.arange(n_experts) % n_dom  # owner domain of each expert
    scores = rng.random((int(tokens.token.max()) + 1, n_experts))[tokens.token]  # [N, E]
    # The domain's experts rank first (score + 1 > any other score), then the rest.
    scores = scores + (own[None, :] == tokens.domain[:, None])
    return np.argsort(-scores, axis=1)[:, :top_k]


def _strength(spec: RouterSpec) -> float:
    if spec.strength is None:
        raise ValueError(f"router {spec.kind!r} needs a strength: {spec.kind}:<strength in [0, 1]>")
    return spec.strength


def draw_routing(
    spec: RouterSpec, tokens: ValidationTokens, n_experts: int, top_k: int, rng: np.random.Generator | int
) -> np.ndarray:
    """One replicate of router `spec` over `tokens`: expert ids [N, K] (distinct per token)."""
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must lie in [1, E={n_experts}], got {top_k}")
    gen = np.random.default_rng(rng)
    n, kind = tokens.size, spec.kind
    hashed = lambda: _keyed(tokens.token, n_experts, top_k, gen)  # noqa: E731
    position_bucket = tokens.position * 16 // max(tokens.seq_len, 1)
    if kind == "random":
        return _random(n, n_experts, top_k, gen)
    if kind == "hash":
        return hashed()
    if kind == "bigram":
        return _keyed(tokens.prev_token, n_experts, top_k, gen)
    if kind == "position":
        return _keyed(position_bucket, n_experts, top_k, gen)
    if kind == "doc_position":
        return _keyed(np.floor(np.log2(tokens.doc_position + 1)).astype(np.int64), n_experts, top_k, gen)
    if kind == "doc_length":
        length = tokens.doc_length
        edges = np.quantile(length, np.linspace(0, 1, 9)[1:-1])
        return _keyed(np.searchsorted(edges, length, side="right"), n_experts, top_k, gen)
    if kind == "doc":
        return _pick(gen.random(n) < _strength(spec), _keyed(tokens.doc, n_experts, top_k, gen), hashed())
    if kind == "mix":
        rules = np.stack(
            [
                hashed(),
                _keyed(tokens.doc, n_experts, top_k, gen),
                _keyed(position_bucket, n_experts, top_k, gen),
                _keyed(tokens.prev_token, n_experts, top_k, gen),
            ]
        )
        return rules[gen.integers(0, rules.shape[0], size=n), np.arange(n)]
    if kind == "demix":
        return _own_experts(tokens, n_experts, top_k, gen)
    if kind in ("domain", "domain_hash"):
        base = _random(n, n_experts, top_k, gen) if kind == "domain" else hashed()
        return _pick(gen.random(n) < _strength(spec), _own_experts(tokens, n_experts, top_k, gen), base)
    raise ValueError(f"unknown router kind {kind!r}")


def domain_expert_table(tokens: ValidationTokens, experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[D, E] assignments of one replicate."""
    return contingency(tokens.domain, experts, len(tokens.domains), n_experts)


# ----------------------------------------------------------------------------- rates
def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (stays inside [0, 1] and is sensible at 0/n)."""
    if trials <= 0:
        return float("nan"), float("nan")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2.0))
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# ----------------------------------------------------------------------------- the battery
DEFAULT_ROUTERS = (
    "random",
    "hash",
    "bigram",
    "position",
    "doc_position",
    "doc_length",
    "doc:0.25",
    "doc:0.5",
    "doc:0.75",
    "doc:1",
    "mix",
    "domain:0.05",
    "domain:0.1",
    "domain:0.15",
    "domain:0.2",
    "domain:0.3",
    "domain:0.5",
    "domain:1",
    "domain_hash:0.1",
    "domain_hash:0.3",
    "domain_hash:1",
    "demix",
)


@dataclass
class BatteryConfig:
    """What `run_battery` draws and how each replicate is judged (Hydra: `moe-calibrate`)."""

    # Router specs (`parse_router`): fixed rules and graded ones with a strength after ':'.
    routers: list[str] = field(default_factory=lambda: list(DEFAULT_ROUTERS))
    top_k: list[int] = field(default_factory=lambda: [1, 2])
    num_experts: int = 8
    replicates: int = 100
    # What the held-out I(D;E|C) conditions on: "token" or "bigram" (as analysis.context).
    context: str = "token"
    n_permutations: int = 200
    n_bootstrap: int = 200
    confidence: float = 0.95
    seed: int = 0
    # The true NMI at which power is read off (the detection limit the verdict is built for).
    detection_limit: float = 0.05
    # Simulated layers per cell of the knockout battery (`knockout_battery`; 0 = skip it).
    knockout_replicates: int = 50
    # Share of each domain's routing mass a standing committee carries (`judge_committees`).
    committee_mass: float = 0.5
    # Worker processes (1 = in this process); the path and probe batteries use them too.
    workers: int = 1
    thresholds: VerdictThresholds = field(default_factory=VerdictThresholds)


def _routing_verdict(
    nmi: SpecializationResult, held: HeldoutInformation | None, thresholds: VerdictThresholds
) -> tuple[LayerVerdict, tuple[float, float, float, float, float, float]]:
    """The layer verdict of an NMI result and a held-out estimate (a layer's or a path's), and the
    held-out numbers (share, its interval, p, H(D|C), bits); all nan without a held-out estimate
    (too few records), whose criterion then abstains, as in moe-analyze."""
    nan = float("nan")
    numbers = (
        (nan,) * 6
        if held is None
        else (
            held.share,
            held.share_ci_low,
            held.share_ci_high,
            held.p_value,
            held.h_domain_given_context,
            held.estimate,
        )
    )
    share, share_low, share_high, p_value, h_dc, _ = numbers
    verdict = judge_layer(
        LayerEvidence(
            layer=0,
            nmi_excess=nmi.excess,
            nmi_excess_ci_low=nmi.excess_ci_low,
            nmi_excess_ci_high=nmi.excess_ci_high,
            nmi_p_value=nmi.p_value,
            cmi_share=share,
            cmi_share_ci_low=share_low,
            cmi_share_ci_high=share_high,
            cmi_p_value=p_value,
            h_domain_given_context=h_dc,
        ),
        thresholds,
    )
    return verdict, numbers


def judge_replicate(
    tokens: ValidationTokens, experts: np.ndarray, cfg: BatteryConfig, rng: np.random.Generator | int
) -> dict[str, Any]:
    """The routing criteria and the combined verdict of one routing record [N, K] over `tokens`,
    computed exactly as `analyze_model` computes them for a trained model's layer."""
    n_dom, n_exp = len(tokens.domains), cfg.num_experts
    docs = doc_expert_counts(tokens.doc, tokens.domain, experts, n_dom, n_exp)
    ev = routing_evidence(
        docs,
        n_dom,
        n_exp,
        token=tokens.token,
        prev_token=tokens.prev_token,
        domain=tokens.domain,
        doc=tokens.doc,
        experts=experts,
        context=cfg.context,
        n_permutations=cfg.n_permutations,
        n_bootstrap=cfg.n_bootstrap,
        confidence=cfg.confidence,
        rng=rng,
    )
    nmi, cmi = ev.nmi, ev.cmi
    # No cmi when the records are too few for the held-out estimate (`ev.cmi_note` says why): its
    # criterion abstains, as in moe-analyze, and the row carries nan.
    layer, (share, share_low, share_high, p_value, _, bits) = _routing_verdict(nmi, cmi, cfg.thresholds)
    by_name = {c.name: c.verdict for c in layer.criteria}
    return {
        "nmi_excess": nmi.excess,
        "nmi_excess_ci_high": nmi.excess_ci_high,
        "nmi_p": nmi.p_value,
        "nmi_null_q95": nmi.null_q95,
        "nmi_plugin": nmi.observed,
        "cmi_share": share,
        "cmi_share_ci_high": share_high,
        "cmi_p": p_value,
        "cmi_bits": bits,
        "nmi": by_name["nmi"],
        "cmi": by_name["cmi"],
        "verdict": layer.verdict,
    }


# The committee columns of a replicate's row (`judge_committees`).
COMMITTEE_COLUMNS = (
    "committee_overlap",
    "committee_null_mean",
    "committee_p",
    "committee_mean_size",
    "committee_null_mean_size",
    "committee_disjoint",
)


def judge_committees(
    tokens: ValidationTokens, experts: np.ndarray, cfg: BatteryConfig, rng: np.random.Generator | int
) -> dict[str, Any]:
    """Standing committees of one routing record [N, K] over `tokens`: `committee_evidence` on its
    document table (mass `cfg.committee_mass`, `cfg.n_permutations` document permutations), the
    overlap, its null mean, p-value, mean committee size (observed and under the null), and the
    committee call `committee_disjoint`: the overlap lies significantly below its document null
    (p < alpha), the committee reading of "domain-specialist layer"."""
    n_dom = len(tokens.domains)
    docs = doc_expert_counts(tokens.doc, tokens.domain, experts, n_dom, cfg.num_experts)
    c = committee_evidence(
        docs,
        n_dom,
        mass=cfg.committee_mass,
        n_permutations=cfg.n_permutations,
        n_bootstrap=cfg.n_bootstrap,
        confidence=cfg.confidence,
        rng=rng,
    )
    return {
        "committee_overlap": c.overlap,
        "committee_null_mean": c.null_mean,
        "committee_p": c.p_value,
        "committee_mean_size": c.mean_size,
        "committee_null_mean_size": c.null_mean_size,
        "committee_disjoint": bool(c.p_value < cfg.thresholds.alpha),
    }


def _run_cell(args: tuple) -> tuple[list[dict[str, Any]], np.ndarray]:
    tokens, cfg, router, k, seeds, verdict, committees = args
    spec = parse_router(router)
    rows, joint = [], np.zeros((len(tokens.domains), cfg.num_experts))
    for rep, seed in enumerate(seeds):
        # A third stream for the committees: the first two (draw, verdict) are those of spawn(2).
        draw_rng, judge_rng, committee_rng = np.random.default_rng(seed).spawn(3)
        experts = draw_routing(spec, tokens, cfg.num_experts, k, draw_rng)
        table = domain_expert_table(tokens, experts, cfg.num_experts)
        joint += table
        row: dict[str, Any] = {
            "router": spec.name,
            "kind": spec.kind,
            "strength": spec.strength,
            "truth": spec.truth,
            "top_k": k,
            "replicate": rep,
        }
        if verdict:
            row.update(judge_replicate(tokens, experts, cfg, judge_rng))
        else:
            row["nmi_plugin"] = float(normalized_mutual_information(table))
        if committees:
            row.update(judge_committees(tokens, experts, cfg, committee_rng))
        rows.append(row)
    return rows, joint / max(len(seeds), 1)


def run_battery(
    tokens: ValidationTokens,
    cfg: BatteryConfig,
    progress: bool = False,
    *,
    verdict: bool = True,
    committees: bool = True,
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], float]]:
    """Every (router, top_k) cell over `cfg.replicates` replicates: the per-replicate rows and each
    cell's expected NMI (of its mean table). Deterministic given cfg.seed, whatever cfg.workers.

    verdict: judge each replicate as a trained layer (`judge_replicate`, the costly part);
    committees: add its committee columns (`judge_committees`, ~30 ms a replicate). The draws and
    the verdict's numbers do not depend on either switch: committees alone score the very
    replicates the verdict battery judges (same cfg.seed and validation tokens)."""
    specs = [parse_router(r) for r in cfg.routers]
    if cfg.replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {cfg.replicates}")
    if not (verdict or committees):
        raise ValueError("run_battery needs verdict or committees (or both)")
    cells = [(s.name, k) for s in specs for k in cfg.top_k]
    seeds = np.random.SeedSequence(cfg.seed).spawn(len(cells))
    jobs = [
        (tokens, cfg, name, k, seed.spawn(cfg.replicates), verdict, committees) for (name, k), seed in zip(cells, seeds)
    ]
    results = _map_jobs(_run_cell, jobs, cfg.workers, [f"{name} k={k}" for name, k in cells] if progress else None)
    rows = [row for cell_rows, _ in results for row in cell_rows]
    expected = {cell: float(normalized_mutual_information(joint)) for cell, (_, joint) in zip(cells, results)}
    return rows, expected


def _map_jobs(fn: Any, jobs: Sequence[Any], workers: int, labels: Sequence[str] | None) -> list[Any]:
    """[fn(job) for job in jobs], in `workers` spawned processes when > 1 (results in job order);
    with labels, one progress line per finished job."""
    out = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for i, result in enumerate(pool.imap(fn, jobs)):
                out.append(result)
                if labels is not None:
                    print(f"[{i + 1}/{len(jobs)}] {labels[i]}", flush=True)
    else:
        for i, job in enumerate(jobs):
            out.append(fn(job))
            if labels is not None:
                print(f"[{i + 1}/{len(jobs)}] {labels[i]}", flush=True)
    return out


CRITERIA = ("nmi", "cmi", "verdict")


def summarize_battery(
    rows: Sequence[Mapping[str, Any]], expected_nmi: Mapping[tuple[str, int], float], confidence: float = 0.95
) -> list[dict[str, Any]]:
    """One entry per (router, top_k): replicates, expected NMI, mean NMI null q95, and for each of
    nmi, cmi and the combined verdict the rates of specialist / ensemble with Wilson intervals."""
    cells: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["router"], int(row["top_k"])), []).append(row)
    out = []
    for (router, k), rs in cells.items():
        entry: dict[str, Any] = {
            "router": router,
            "top_k": k,
            "truth": rs[0]["truth"],
            "kind": rs[0]["kind"],
            "strength": rs[0]["strength"],
            "replicates": len(rs),
            "expected_nmi": expected_nmi.get((router, k), float("nan")),
            "nmi_excess_mean": float(np.mean([r["nmi_excess"] for r in rs])),
            "nmi_null_q95_mean": float(np.mean([r["nmi_null_q95"] for r in rs])),
            "cmi_share_mean": float(np.nanmean([r["cmi_share"] for r in rs])),
        }
        for c in CRITERIA:
            for label in (SPECIALIST, ENSEMBLE):
                hits = sum(r[c] == label for r in rs)
                low, high = wilson_interval(hits, len(rs), confidence)
                entry[f"{c}_{label}"] = hits / len(rs)
                entry[f"{c}_{label}_ci"] = [low, high]
        out.append(entry)
    return out


def check_targets(
    summary: Sequence[Mapping[str, Any]], thresholds: VerdictThresholds, power_at: float
) -> dict[str, Any]:
    """The calibration targets, measured: the largest false-specialist rate of the combined verdict
    and of each criterion on domain-blind routers (target <= alpha), power at a true NMI of
    `power_at` (>= 0.8, interpolated along the `domain:s` curve of each top_k), and the
    false-ensemble rate on domain-aware routers at or above that NMI (target 0)."""
    blind = [s for s in summary if s["truth"] == DOMAIN_BLIND]
    aware = [s for s in summary if s["truth"] == DOMAIN_AWARE]
    out: dict[str, Any] = {"alpha": thresholds.alpha, "power_at_nmi": power_at}
    for c in CRITERIA:
        worst = max(blind, key=lambda s: s[f"{c}_{SPECIALIST}"], default=None)
        out[f"max_false_specialist_{c}"] = (
            None
            if worst is None
            else {"rate": worst[f"{c}_{SPECIALIST}"], "router": worst["router"], "top_k": worst["top_k"]}
        )
    power = {
        k: _power_at(
            [
                (s["expected_nmi"], s[f"verdict_{SPECIALIST}"])
                for s in aware
                if s["kind"] == "domain" and s["top_k"] == k
            ],
            power_at,
        )
        for k in sorted({s["top_k"] for s in summary})
    }
    out["power"] = power
    above = [s for s in aware if s["expected_nmi"] >= power_at]
    worst = max(above, key=lambda s: s[f"verdict_{ENSEMBLE}"], default=None)
    out["max_false_ensemble_above_limit"] = (
        None
        if worst is None
        else {"rate": worst[f"verdict_{ENSEMBLE}"], "router": worst["router"], "top_k": worst["top_k"]}
    )
    met_fs = all(
        out[f"max_false_specialist_{c}"] is None or out[f"max_false_specialist_{c}"]["rate"] <= thresholds.alpha
        for c in ("verdict", "cmi")
    )
    met_power = all(p is not None and p >= 0.8 for p in power.values())
    met_fe = worst is None or worst[f"verdict_{ENSEMBLE}"] == 0.0
    out["met"] = {"false_specialist": met_fs, "power": met_power, "false_ensemble": met_fe}
    return out


def _power_at(points: Sequence[tuple[float, float]], at: float) -> float | None:
    """The rate at truth `at`, linearly interpolated along (truth, rate) points sorted by truth; None
    when fewer than two points or `at` lies outside their range."""
    curve = sorted(points, key=lambda p: p[0])
    if len(curve) >= 2 and curve[0][0] <= at <= curve[-1][0]:
        return float(np.interp(at, [p[0] for p in curve], [p[1] for p in curve]))
    return None


def _rate_entry(entry: dict[str, Any], key: str, hits: int, n: int, confidence: float) -> None:
    """entry[key] = hits / n and entry[key + "_ci"] = its Wilson interval."""
    entry[key] = hits / n if n else float("nan")
    entry[f"{key}_ci"] = list(wilson_interval(hits, n, confidence))


def _cells_of(rows: Sequence[Mapping[str, Any]], *keys: str) -> dict[tuple, list[Mapping[str, Any]]]:
    cells: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        cells.setdefault(tuple(row[k] for k in keys), []).append(row)
    return cells


def _mean(rs: Sequence[Mapping[str, Any]], key: str, fn: Any = np.nanmean) -> float:
    values = np.asarray([r[key] for r in rs], dtype=np.float64)
    return float(fn(values)) if np.isfinite(values).any() else float("nan")


# ----------------------------------------------------------------------------- committees: rates
def summarize_committees(
    rows: Sequence[Mapping[str, Any]], expected_nmi: Mapping[tuple[str, int], float], confidence: float = 0.95
) -> list[dict[str, Any]]:
    """One entry per (router, top_k) of rows with committee columns: replicates, expected NMI, the
    means of the overlap, its null mean and the committee sizes, the median p-value, and the rate of
    the committee call "disjoint" with its Wilson interval (`committee_disjoint`, `_ci`)."""
    out = []
    for (router, k), rs in _cells_of(rows, "router", "top_k").items():
        entry: dict[str, Any] = {
            "router": router,
            "top_k": int(k),
            "truth": rs[0]["truth"],
            "kind": rs[0]["kind"],
            "strength": rs[0]["strength"],
            "replicates": len(rs),
            "expected_nmi": expected_nmi.get((router, int(k)), float("nan")),
            "overlap_mean": _mean(rs, "committee_overlap"),
            "null_mean_mean": _mean(rs, "committee_null_mean"),
            "size_mean": _mean(rs, "committee_mean_size"),
            "null_size_mean": _mean(rs, "committee_null_mean_size"),
            "p_median": _mean(rs, "committee_p", np.nanmedian),
        }
        _rate_entry(entry, "committee_disjoint", sum(bool(r["committee_disjoint"]) for r in rs), len(rs), confidence)
        out.append(entry)
    return out


def check_committee_targets(summary: Sequence[Mapping[str, Any]], alpha: float, power_at: float) -> dict[str, Any]:
    """The committee call's false-disjoint rate on domain-blind routers (largest and per top_k,
    target <= alpha) and its power at a true NMI of `power_at` (>= 0.8, interpolated along the
    `domain:s` curve of each top_k)."""
    blind = [s for s in summary if s["truth"] == DOMAIN_BLIND]
    aware = [s for s in summary if s["truth"] == DOMAIN_AWARE]
    worst = max(blind, key=lambda s: s["committee_disjoint"], default=None)
    power = {
        k: _power_at(
            [(s["expected_nmi"], s["committee_disjoint"]) for s in aware if s["kind"] == "domain" and s["top_k"] == k],
            power_at,
        )
        for k in sorted({s["top_k"] for s in summary})
    }
    over = sorted(
        (
            {"router": s["router"], "top_k": s["top_k"], "rate": s["committee_disjoint"]}
            for s in blind
            if s["committee_disjoint"] > alpha
        ),
        key=lambda w: -w["rate"],
    )
    return {
        "alpha": alpha,
        "power_at_nmi": power_at,
        "max_false_disjoint": None
        if worst is None
        else {"rate": worst["committee_disjoint"], "router": worst["router"], "top_k": worst["top_k"]},
        "false_disjoint_above_alpha": over,
        "power": power,
        "met": {
            "false_disjoint": worst is None or worst["committee_disjoint"] <= alpha,
            "power": all(p is not None and p >= 0.8 for p in power.values()),
        },
    }


# ----------------------------------------------------------------------------- knockouts
def knockout_battery(
    replicates: int = 50,
    *,
    damages: Sequence[float] = (0.05, 0.01, 0.003),
    expert_sd: Sequence[float] = (0.3, 0.6),
    num_experts: int = 8,
    num_groups: int = 24,
    num_domains: int = 4,
    tokens_per_domain: int = 4096,
    dense_sd: float = 0.3,
    thresholds: VerdictThresholds | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The knockout criterion on simulated damage whose truth is known (`simulate_damage`): per
    (mean damage m, experts' per-token sd, truth), `replicates` layers of `num_experts` experts that
    hurt every domain alike ("equal", truth: not specialist) or one domain only ("single"), each
    judged against `num_groups` dense unit groups hurting every domain alike at damages spread
    log-uniformly over [m/2, 2m] (per-token sd `dense_sd`). Rows: the rates of the criterion's calls
    and the medians of the old selectivity (max - mean)/mean/(D-1), which drifts with m, and of the
    noise-corrected CV, which does not."""
    from analysis.knockout_stats import corrected_cv, matched_comparison, selectivity, simulate_damage

    t = thresholds or VerdictThresholds()
    gen = np.random.default_rng(seed)
    rows = []
    for m in damages:
        for sd in expert_sd:
            for profile in ("equal", "single"):
                calls, old, cv = [], [], []
                for _ in range(replicates):
                    ex = simulate_damage(
                        num_experts,
                        m,
                        num_domains=num_domains,
                        profile=profile,
                        target=int(gen.integers(num_domains)),
                        tokens_per_domain=tokens_per_domain,
                        token_sd=sd,
                        rng=gen,
                    )
                    dense_m = m * np.exp(gen.uniform(np.log(0.5), np.log(2.0), num_groups))
                    dense = [
                        simulate_damage(
                            1,
                            float(dm),
                            num_domains=num_domains,
                            tokens_per_domain=tokens_per_domain,
                            token_sd=dense_sd,
                            rng=gen,
                        )
                        for dm in dense_m
                    ]
                    dd = np.concatenate([d.damage for d in dense], axis=1)
                    dse = np.concatenate([d.damage_se for d in dense], axis=1)
                    cmp = matched_comparison(ex.damage[None], ex.damage_se[None], dd[None], dse[None])
                    calls.append(judge_knockout(cmp.percentile[0], t).verdict)
                    old.append(np.nanmedian(selectivity(ex.damage)))
                    cv.append(np.nanmedian(corrected_cv(ex.damage, ex.damage_se)))
                n = len(calls)
                rows.append(
                    {
                        "mean_damage": m,
                        "expert_sd": sd,
                        "profile": profile,
                        "truth": DOMAIN_BLIND if profile == "equal" else DOMAIN_AWARE,
                        "replicates": n,
                        "specialist": sum(c == SPECIALIST for c in calls) / n,
                        "specialist_ci": list(wilson_interval(sum(c == SPECIALIST for c in calls), n)),
                        "ensemble": sum(c == ENSEMBLE for c in calls) / n,
                        "old_selectivity_median": float(np.median(old)),
                        "cv_median": float(np.median(cv)),
                    }
                )
    return rows


# ----------------------------------------------------------------------------- paths
PATH_ROUTERS = (
    "random",
    "hash",
    "bigram",
    "doc_length",
    "doc:1",
    "domain:0.1",
    "domain:0.15",
    "domain:0.2",
    "domain:0.3",
    "xor:0.2",
    "xor:0.3",
    "xor:1",
)

# Independent random streams of the three batteries under one seed.
_PATH_STREAM, _PROBE_STREAM = 1, 2


@dataclass
class PathBatteryConfig:
    """The two-layer path battery (`run_path_battery`). The experts, permutations, bootstrap,
    confidence, context, seed, workers and thresholds are the main battery's (`BatteryConfig`)."""

    # Rules per layer (`parse_path_router`): any router of `parse_router`, drawn independently for
    # each of the two layers (top-1), or the planted pair xor:s.
    routers: list[str] = field(default_factory=lambda: list(PATH_ROUTERS))
    # Fewer rules than the routers battery; a replicate costs ~0.6 s on ~1e5 tokens (one CPU thread).
    replicates: int = 100
    # The true path NMI at which power is read off along domain:s.
    detection_limit: float = 0.05


def parse_path_router(text: str) -> RouterSpec:
    """A path battery rule: `"xor:s"` (the planted pair; truth domain-aware for s > 0) or any
    `parse_router` spec, drawn independently for each layer."""
    kind, _, arg = str(text).partition(":")
    if kind != "xor":
        return parse_router(text)
    try:
        s = float(arg)
    except ValueError:
        s = float("nan")
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"path router {text!r}: xor needs a strength in [0, 1] after ':'")
    return RouterSpec("xor", s, DOMAIN_AWARE if s > 0 else DOMAIN_BLIND)


def draw_path_pair(
    spec: RouterSpec, tokens: ValidationTokens, n_experts: int, rng: np.random.Generator | int
) -> tuple[np.ndarray, np.ndarray]:
    """Two layers' top-1 experts [N] each for one replicate of path rule `spec`.

    xor:s: the first layer's expert u is uniform per token; the second's is (u + d) mod E for the
    token's domain d with probability s, else uniform. Each layer alone is then uniform and
    independent of the domain (exactly domain-blind in distribution), while the pair's difference
    codes the domain (XOR of two bits, generalized to D <= E domains). Any other rule: two
    independent draws of `draw_routing` (top-1), e.g. two hash layers with their own hash functions."""
    gen = np.random.default_rng(rng)
    if spec.kind == "xor":
        n_dom = len(tokens.domains)
        if n_experts < n_dom:
            raise ValueError(f"xor needs at least one expert per domain: E={n_experts} < D={n_dom}")
        first = gen.integers(0, n_experts, size=tokens.size)
        coded = (first + tokens.domain) % n_experts
        second = np.where(gen.random(tokens.size) < _strength(spec), coded, gen.integers(0, n_experts, tokens.size))
        return first, second
    r0, r1 = gen.spawn(2)
    return (
        draw_routing(spec, tokens, n_experts, 1, r0)[:, 0],
        draw_routing(spec, tokens, n_experts, 1, r1)[:, 0],
    )


def path_records(tokens: ValidationTokens, layers: Sequence[np.ndarray], n_experts: int) -> RoutingRecords:
    """`RoutingRecords` of top-1 layers (experts [N] each; one kept slot, gate 1) over `tokens`."""
    return RoutingRecords(
        list(tokens.domains),
        tokens.token,
        tokens.domain,
        tokens.doc,
        tokens.position,
        [
            LayerRecords(
                np.asarray(e, dtype=np.int64)[:, None],
                np.ones((tokens.size, 1), np.float32),
                np.ones((tokens.size, 1), bool),
            )
            for e in layers
        ],
        n_experts,
        1,
    )


def judge_path_replicate(
    tokens: ValidationTokens,
    layers: Sequence[np.ndarray],
    cfg: BatteryConfig,
    rng: np.random.Generator | int,
) -> dict[str, Any]:
    """`path_information` (top1, per layer, held-out I(D;path|C) with C = cfg.context) of top-1
    layers [N] each, judged as a layer: `judge_layer` on the path's NMI excess (document null,
    bootstrap interval) and its held-out share, with cfg.thresholds; plus each layer's own NMI
    criterion (`judge_nmi`) for comparison."""
    n_dom, n_exp = len(tokens.domains), cfg.num_experts
    res = path_information(
        path_records(tokens, layers, n_exp),
        n_dom,
        mode="top1",
        n_permutations=cfg.n_permutations,
        n_bootstrap=cfg.n_bootstrap,
        confidence=cfg.confidence,
        rng=rng,
        per_layer=True,
        heldout=True,
        context=cfg.context,
        max_heldout_paths=max(256, n_exp ** len(layers)),
    )
    nmi, held = res.nmi, res.heldout
    verdict, (share, share_low, share_high, p_value, _, bits) = _routing_verdict(nmi, held, cfg.thresholds)
    by_name = {c.name: c.verdict for c in verdict.criteria}
    row: dict[str, Any] = {
        "path_nmi_excess": nmi.excess,
        "path_nmi_excess_ci_high": nmi.excess_ci_high,
        "path_nmi_p": nmi.p_value,
        "path_nmi_null_q95": nmi.null_q95,
        "path_nmi_plugin": nmi.observed,
        "path_bits": res.bits,
        "n_paths": res.n_paths,
        "heldout_share": share,
        "heldout_share_ci_high": share_high,
        "heldout_p": p_value,
        "heldout_bits": bits,
    }
    for layer in res.per_layer:
        s = layer.nmi
        row[f"layer{layer.layer}_nmi_excess"] = s.excess
        row[f"layer{layer.layer}_nmi"] = judge_nmi(
            s.excess, s.excess_ci_low, s.excess_ci_high, s.p_value, cfg.thresholds
        ).verdict
    row["layer_nmi_excess_max"] = max(layer.nmi.excess for layer in res.per_layer)
    row["layer_nmi_specialist"] = any(row[f"layer{layer.layer}_nmi"] == SPECIALIST for layer in res.per_layer)
    row.update(nmi=by_name["nmi"], cmi=by_name["cmi"], verdict=verdict.verdict)
    return row


def _run_path_cell(args: tuple) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    tokens, cfg, router, seeds = args
    spec = parse_path_router(router)
    n_dom, e = len(tokens.domains), cfg.num_experts
    rows = []
    path_joint, layer_joint = np.zeros((n_dom, e * e)), np.zeros((2, n_dom, e))
    for rep, seed in enumerate(seeds):
        draw_rng, judge_rng = np.random.default_rng(seed).spawn(2)
        first, second = draw_path_pair(spec, tokens, e, draw_rng)
        path_joint += contingency(tokens.domain, (first * e + second)[:, None], n_dom, e * e)
        layer_joint[0] += contingency(tokens.domain, first[:, None], n_dom, e)
        layer_joint[1] += contingency(tokens.domain, second[:, None], n_dom, e)
        rows.append(
            {
                "router": spec.name,
                "kind": spec.kind,
                "strength": spec.strength,
                "truth": spec.truth,
                "replicate": rep,
                **judge_path_replicate(tokens, [first, second], cfg, judge_rng),
            }
        )
    n = max(len(seeds), 1)
    return rows, path_joint / n, layer_joint / n


def run_path_battery(
    tokens: ValidationTokens, paths: PathBatteryConfig, cfg: BatteryConfig, progress: bool = False
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Every path rule of `paths.routers` over `paths.replicates` two-layer replicates (E, nulls,
    thresholds, seed and workers of `cfg`): the per-replicate rows (`judge_path_replicate`) and per
    rule the true path NMI (of the mean domain x (expert, expert) table over the replicates) and the
    true NMI of each layer alone (their mean). Deterministic given cfg.seed, whatever cfg.workers."""
    if paths.replicates < 1:
        raise ValueError(f"paths.replicates must be >= 1, got {paths.replicates}")
    specs = [parse_path_router(r) for r in paths.routers]
    seeds = np.random.SeedSequence([cfg.seed, _PATH_STREAM]).spawn(len(specs))
    jobs = [(tokens, cfg, s.name, seed.spawn(paths.replicates)) for s, seed in zip(specs, seeds)]
    results = _map_jobs(_run_path_cell, jobs, cfg.workers, [f"paths {s.name}" for s in specs] if progress else None)
    rows = [row for cell_rows, _, _ in results for row in cell_rows]
    expected = {
        s.name: {
            "path_nmi": float(normalized_mutual_information(pj)),
            "layer_nmi": float(np.mean([normalized_mutual_information(lj) for lj in layer_js])),
        }
        for s, (_, pj, layer_js) in zip(specs, results)
    }
    return rows, expected


PATH_CRITERIA = ("nmi", "cmi", "verdict")


def summarize_path_battery(
    rows: Sequence[Mapping[str, Any]], expected: Mapping[str, Mapping[str, float]], confidence: float = 0.95
) -> list[dict[str, Any]]:
    """One entry per path rule: replicates, true path NMI and per-layer NMI, mean path NMI excess,
    mean of the larger per-layer NMI excess, mean held-out share, mean distinct paths, and the
    rates (Wilson intervals) of the path's nmi / cmi criteria and verdict calling specialist, of
    the verdict calling ensemble, and of either layer's own NMI criterion calling specialist."""
    out = []
    for (router,), rs in _cells_of(rows, "router").items():
        n = len(rs)
        truth = expected.get(router, {})
        entry: dict[str, Any] = {
            "router": router,
            "truth": rs[0]["truth"],
            "kind": rs[0]["kind"],
            "strength": rs[0]["strength"],
            "replicates": n,
            "expected_path_nmi": truth.get("path_nmi", float("nan")),
            "expected_layer_nmi": truth.get("layer_nmi", float("nan")),
            "path_nmi_excess_mean": _mean(rs, "path_nmi_excess"),
            "layer_nmi_excess_max_mean": _mean(rs, "layer_nmi_excess_max"),
            "heldout_share_mean": _mean(rs, "heldout_share"),
            "n_paths_mean": _mean(rs, "n_paths"),
        }
        for c in PATH_CRITERIA:
            _rate_entry(entry, f"{c}_{SPECIALIST}", sum(r[c] == SPECIALIST for r in rs), n, confidence)
        _rate_entry(entry, f"verdict_{ENSEMBLE}", sum(r["verdict"] == ENSEMBLE for r in rs), n, confidence)
        _rate_entry(entry, "layer_nmi_specialist", sum(bool(r["layer_nmi_specialist"]) for r in rs), n, confidence)
        out.append(entry)
    return out


def check_path_targets(summary: Sequence[Mapping[str, Any]], alpha: float, power_at: float) -> dict[str, Any]:
    """The path call's largest false-specialist rate on domain-blind rules (target <= alpha), its
    power at a true path NMI of `power_at` along domain:s (>= 0.8) and its rate on each xor pair."""
    blind = [s for s in summary if s["truth"] == DOMAIN_BLIND]
    worst = max(blind, key=lambda s: s[f"verdict_{SPECIALIST}"], default=None)
    power = _power_at(
        [(s["expected_path_nmi"], s[f"verdict_{SPECIALIST}"]) for s in summary if s["kind"] == "domain"], power_at
    )
    xor = {
        s["router"]: s[f"verdict_{SPECIALIST}"] for s in summary if s["kind"] == "xor" and s["truth"] == DOMAIN_AWARE
    }
    return {
        "alpha": alpha,
        "power_at_nmi": power_at,
        "max_false_specialist": None
        if worst is None
        else {"rate": worst[f"verdict_{SPECIALIST}"], "router": worst["router"]},
        "power": power,
        "xor": xor,
        "met": {
            "false_specialist": worst is None or worst[f"verdict_{SPECIALIST}"] <= alpha,
            "power": power is not None and power >= 0.8,
        },
    }


# ----------------------------------------------------------------------------- probe
PROBE_CASES = (
    "noise",
    "doc:0.5",
    "doc:1",
    "domain:0.01",
    "domain:0.02",
    "domain:0.03",
    "domain:0.05",
    "domain:0.1",
    "domain_doc:0.1",
    "domain_doc:0.2",
    "domain_doc:0.3",
)
_PROBE_KINDS = {"noise": False, "doc": True, "domain": True, "domain_doc": True}  # kind: takes a strength


@dataclass
class ProbeBatteryConfig:
    """The synthetic probe battery (`run_probe_battery`); confidence, seed, workers and alpha are
    the main battery's (`BatteryConfig`)."""

    # Inputs with known truth (`parse_probe_case`).
    cases: list[str] = field(default_factory=lambda: list(PROBE_CASES))
    # Model dim D of the synthetic router inputs.
    dim: int = 32
    # A replicate costs ~1-2.5 s on ~1e5 tokens at D = 32 (five probe fits; one CPU thread).
    replicates: int = 40
    n_folds: int = 5
    n_bootstrap: int = 1000


def parse_probe_case(text: str) -> RouterSpec:
    """A synthetic router input with known truth (kind, strength, truth as for routers):

    noise          x ~ N(0, I), independent of everything (domain-blind)
    doc:t          x = noise + a per-document offset ~ N(0, t^2 I) drawn independently of the
                   document's domain (domain-blind document quirks)
    domain:s       x = noise + mu_d, with domain means mu_d ~ N(0, s^2 I) drawn per replicate
                   (domain-aware for s > 0)
    domain_doc:s   domain:s plus per-document offsets of sd 1 (the domain under document quirks)
    """
    kind, _, arg = str(text).partition(":")
    if kind not in _PROBE_KINDS or _PROBE_KINDS[kind] != bool(arg):
        raise ValueError(f"unknown probe case {text!r}; use noise, doc:<sd>, domain:<sd>, domain_doc:<sd> (sd >= 0)")
    if not arg:
        return RouterSpec(kind, None, DOMAIN_BLIND)
    try:
        s = float(arg)
    except ValueError:
        s = float("nan")
    if not s >= 0.0:
        raise ValueError(f"probe case {text!r}: the sd after ':' must be a number >= 0")
    aware = kind in ("domain", "domain_doc") and s > 0
    return RouterSpec(kind, s, DOMAIN_AWARE if aware else DOMAIN_BLIND)


def gaussian_domain_information(x_ND: np.ndarray, domain: np.ndarray, means: np.ndarray, variance: float) -> float:
    """I(D;X) in bits per token of the Gaussian mixture x | d ~ N(means[d], variance I) with the
    domain shares of `domain` as priors, estimated over these tokens: H(D) + mean log2 p(d_i | x_i)
    with the true posterior p(d | x) (the Bayes-optimal probe; no fitting)."""
    g = means.shape[0]
    count = np.bincount(domain, minlength=g).astype(np.float64)
    with np.errstate(divide="ignore"):
        log_prior = np.log(count / count.sum())
    mu = np.asarray(means, dtype=np.float64)
    logit = (np.asarray(x_ND, dtype=np.float64) @ mu.T - 0.5 * (mu * mu).sum(axis=1)) / variance + log_prior
    top = logit.max(axis=1, keepdims=True)
    logp = logit - top - np.log(np.exp(logit - top).sum(axis=1, keepdims=True))
    return float(entropy(count) + logp[np.arange(domain.size), domain].mean() / math.log(2.0))


def draw_hidden_states(
    case: RouterSpec, tokens: ValidationTokens, dim: int, rng: np.random.Generator | int
) -> tuple[np.ndarray, float]:
    """One replicate of probe case `case` (`parse_probe_case`) over `tokens`: router inputs
    x [N, D] float32 (D = `dim`) and the true per-token I(D;X) in bits (0 for the domain-blind
    cases; `gaussian_domain_information` for the domain shifts, with the document offsets' variance
    added to the per-token covariance)."""
    gen = np.random.default_rng(rng)
    n, g = tokens.size, len(tokens.domains)
    x = gen.standard_normal((n, dim), dtype=np.float32)
    variance = 1.0
    if case.kind in ("doc", "domain_doc"):
        sd = _strength(case) if case.kind == "doc" else 1.0
        _, doc_of = np.unique(tokens.doc, return_inverse=True)
        doc_of = doc_of.reshape(-1)
        x += (sd * gen.standard_normal((int(doc_of.max()) + 1, dim))).astype(np.float32)[doc_of]
        variance += sd * sd
    if case.kind in ("domain", "domain_doc"):
        means = _strength(case) * gen.standard_normal((g, dim))
        x += means.astype(np.float32)[tokens.domain]
        return x, gaussian_domain_information(x, tokens.domain, means, variance)
    return x, 0.0


def _run_probe_cell(args: tuple) -> list[dict[str, Any]]:
    tokens, probe, cfg, case_text, seeds = args
    case = parse_probe_case(case_text)
    rows = []
    for rep, seed in enumerate(seeds):
        draw_rng, probe_rng = np.random.default_rng(seed).spawn(2)
        x, truth_bits = draw_hidden_states(case, tokens, probe.dim, draw_rng)
        res = probe_domain_information(
            x,
            tokens.domain,
            tokens.doc,
            len(tokens.domains),
            n_folds=probe.n_folds,
            rng=probe_rng,
            n_bootstrap=probe.n_bootstrap,
            confidence=cfg.confidence,
        )
        rows.append(
            {
                "case": case.name,
                "kind": case.kind,
                "strength": case.strength,
                "truth": case.truth,
                "replicate": rep,
                "truth_bits": truth_bits,
                "bits": res.bits,
                "ci_low": res.ci_low,
                "ci_high": res.ci_high,
                "p": res.p_value,
                "accuracy": res.accuracy,
                "converged": res.converged,
                "positive": bool(res.p_value < cfg.thresholds.alpha),
            }
        )
    return rows


def run_probe_battery(
    tokens: ValidationTokens, probe: ProbeBatteryConfig, cfg: BatteryConfig, progress: bool = False
) -> list[dict[str, Any]]:
    """Every probe case over `probe.replicates` replicates of synthetic router inputs over `tokens`
    (their domains and documents): per replicate the true bits, `probe_domain_information`'s bits,
    interval and p-value, and its claim `positive` (p < alpha). Deterministic given cfg.seed."""
    if probe.replicates < 1:
        raise ValueError(f"probe.replicates must be >= 1, got {probe.replicates}")
    cases = [parse_probe_case(c) for c in probe.cases]
    seeds = np.random.SeedSequence([cfg.seed, _PROBE_STREAM]).spawn(len(cases))
    jobs = [(tokens, probe, cfg, c.name, seed.spawn(probe.replicates)) for c, seed in zip(cases, seeds)]
    results = _map_jobs(_run_probe_cell, jobs, cfg.workers, [f"probe {c.name}" for c in cases] if progress else None)
    return [row for cell_rows in results for row in cell_rows]


def summarize_probe_battery(rows: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """One entry per probe case: replicates, mean true bits, mean and sd of the probe bits, mean
    error (probe - truth), share of converged fits, and the rate of positive claims (p < alpha)
    with its Wilson interval."""
    out = []
    for (case,), rs in _cells_of(rows, "case").items():
        entry: dict[str, Any] = {
            "case": case,
            "truth": rs[0]["truth"],
            "kind": rs[0]["kind"],
            "strength": rs[0]["strength"],
            "replicates": len(rs),
            "truth_bits_mean": _mean(rs, "truth_bits"),
            "bits_mean": _mean(rs, "bits"),
            "bits_sd": _mean(rs, "bits", np.nanstd),
            "error_mean": float(np.mean([r["bits"] - r["truth_bits"] for r in rs])),
            "converged": sum(bool(r["converged"]) for r in rs) / len(rs),
        }
        _rate_entry(entry, "positive", sum(bool(r["positive"]) for r in rs), len(rs), confidence)
        out.append(entry)
    return out


def check_probe_targets(summary: Sequence[Mapping[str, Any]], alpha: float) -> dict[str, Any]:
    """The probe's largest false-positive rate on the domain-blind cases (target <= alpha) and the
    true bits at which its power reaches 0.8 along domain:s (the first crossing, interpolated;
    None when no case reaches it)."""
    blind = [s for s in summary if s["truth"] == DOMAIN_BLIND]
    worst = max(blind, key=lambda s: s["positive"], default=None)
    curve = sorted((s["truth_bits_mean"], s["positive"]) for s in summary if s["kind"] == "domain")
    limit = None
    for (b0, p0), (b1, p1) in zip(curve, curve[1:]):
        if p0 < 0.8 <= p1:
            limit = float(b0 + (0.8 - p0) * (b1 - b0) / (p1 - p0))
            break
    if limit is None and curve and curve[0][1] >= 0.8:
        limit = float(curve[0][0])
    return {
        "alpha": alpha,
        "max_false_positive": None if worst is None else {"rate": worst["positive"], "case": worst["case"]},
        "power_80_at_bits": limit,
        "met": {"false_positive": worst is None or worst["positive"] <= alpha},
    }
