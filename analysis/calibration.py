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

Legend: N tokens, K top-k, E experts, D domains, M documents, S sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analysis.information import contingency, doc_expert_counts, normalized_mutual_information
from analysis.measures import previous_tokens, routing_evidence
from analysis.verdict import ENSEMBLE, SPECIALIST, LayerEvidence, VerdictThresholds, judge_knockout, judge_layer

__all__ = [
    "DEFAULT_ROUTERS",
    "DOMAIN_AWARE",
    "DOMAIN_BLIND",
    "BatteryConfig",
    "RouterSpec",
    "ValidationTokens",
    "check_targets",
    "draw_routing",
    "judge_replicate",
    "knockout_battery",
    "parse_router",
    "run_battery",
    "summarize_battery",
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
    # Worker processes (1 = in this process).
    workers: int = 1
    thresholds: VerdictThresholds = field(default_factory=VerdictThresholds)


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
    nan = float("nan")
    share, share_low, share_high, p_value, h_domain_given_context, bits = (
        (nan,) * 6
        if cmi is None
        else (cmi.share, cmi.share_ci_low, cmi.share_ci_high, cmi.p_value, cmi.h_domain_given_context, cmi.estimate)
    )
    layer = judge_layer(
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
            h_domain_given_context=h_domain_given_context,
        ),
        cfg.thresholds,
    )
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


def _run_cell(args: tuple) -> tuple[list[dict[str, Any]], np.ndarray]:
    tokens, cfg, router, k, seeds = args
    spec = parse_router(router)
    rows, joint = [], np.zeros((len(tokens.domains), cfg.num_experts))
    for rep, seed in enumerate(seeds):
        draw_rng, judge_rng = np.random.default_rng(seed).spawn(2)
        experts = draw_routing(spec, tokens, cfg.num_experts, k, draw_rng)
        joint += domain_expert_table(tokens, experts, cfg.num_experts)
        rows.append(
            {
                "router": spec.name,
                "kind": spec.kind,
                "strength": spec.strength,
                "truth": spec.truth,
                "top_k": k,
                "replicate": rep,
                **judge_replicate(tokens, experts, cfg, judge_rng),
            }
        )
    return rows, joint / max(len(seeds), 1)


def run_battery(
    tokens: ValidationTokens, cfg: BatteryConfig, progress: bool = False
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], float]]:
    """Every (router, top_k) cell over `cfg.replicates` replicates: the per-replicate rows and each
    cell's expected NMI (of its mean table). Deterministic given cfg.seed, whatever cfg.workers."""
    specs = [parse_router(r) for r in cfg.routers]
    if cfg.replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {cfg.replicates}")
    cells = [(s.name, k) for s in specs for k in cfg.top_k]
    seeds = np.random.SeedSequence(cfg.seed).spawn(len(cells))
    jobs = [(tokens, cfg, name, k, seed.spawn(cfg.replicates)) for (name, k), seed in zip(cells, seeds)]
    if cfg.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(cfg.workers) as pool:
            results = [_note(i, len(jobs), r, progress) for i, r in enumerate(pool.imap(_run_cell, jobs))]
    else:
        results = [_note(i, len(jobs), _run_cell(job), progress) for i, job in enumerate(jobs)]
    rows = [row for cell_rows, _ in results for row in cell_rows]
    expected = {cell: float(normalized_mutual_information(joint)) for cell, (_, joint) in zip(cells, results)}
    return rows, expected


def _note(i: int, n: int, result: Any, progress: bool) -> Any:
    if progress:
        first = result[0][0] if result[0] else {}
        print(f"[{i + 1}/{n}] {first.get('router')} k={first.get('top_k')}", flush=True)
    return result


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
    power: dict[int, float | None] = {}
    for k in sorted({s["top_k"] for s in summary}):
        curve = sorted(
            (
                (s["expected_nmi"], s[f"verdict_{SPECIALIST}"])
                for s in aware
                if s["kind"] == "domain" and s["top_k"] == k
            ),
            key=lambda p: p[0],
        )
        if len(curve) >= 2 and curve[0][0] <= power_at <= curve[-1][0]:
            power[k] = float(np.interp(power_at, [p[0] for p in curve], [p[1] for p in curve]))
        else:
            power[k] = None
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
