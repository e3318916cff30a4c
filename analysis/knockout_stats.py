"""Statistics of knockout damage: per-domain damage with a document-robust standard error, a
selectivity that does not drift with the size of the damage, the matched-damage comparison of
experts with the dense control, and a simulator of units whose truth is known.

Pure numpy/scipy (and the torch-free `moe.validation`): imports neither torch nor the model (the
interventions live in `analysis.knockout`), so calibration code can run the knockout criterion on
simulated tables.

Legend as in `moe/__init__.py`: L layers, G domains, U units (experts or dense groups), N evaluated
tokens; clusters (documents) and the dense groups beside experts are spelled out. Damage is a loss
increase in nats: knocked-out minus intact next-token loss, paired on the same tokens. Tables put
the domain axis second to last: damage [..., G, U].

- `cluster_mean_se`: per-domain mean of per-token values and its cluster-robust (CR1) standard
  error, clusters = documents (tokens of one document are correlated).
- `corrected_cv`: the noise-corrected coefficient of variation of a unit's damage across domains,
  divided by sqrt(G): sqrt(max(var_d(damage) - mean_d(se^2), 0)) / mean_d(damage) / sqrt(G).
  var_d uses ddof=1, so E[var_d(damage)] = tau^2 + mean_d(se^2) with tau^2 the between-domain
  variance of the true damages; the numerator estimates tau, whatever the damage size. 0 for a unit
  that hurts every domain equally, 1 for one that hurts a single domain (non-negative damages).
- `cochran_q`: Cochran's Q heterogeneity test of the G damages (chi^2 with G-1 degrees of freedom
  when the true damage is equal across domains, whatever its size) and its p-value.
- `heterogeneity`: all of the above for a table at once (`Heterogeneity`).
- `cv_lower_bound`: a 95% lower confidence bound of the corrected CV (noncentral chi^2 inversion
  of Q): exactly 0 with probability 0.95 for an equal-damage unit, at any damage size and se.
- `matched_comparison`: each expert's selectivity (by default `cv_lower_bound`) against the same
  layer's dense groups whose mean damage lies within a factor of the expert's: percentile and
  one-sided p-value, plus the damages compared.
- `simulate_damage`: per-token differences of units with known truth (equal damage, one domain,
  or any profile) at a given mean damage and noise, reduced by `cluster_mean_se` as real tables are.
- `selectivity`: the old (max - mean) / mean / (G - 1) of the clipped damage. It drifts with the
  size of the damage (noise inflates it when the damage is small); kept only for callers that
  have not moved to `corrected_cv`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from moe.validation import check_choice

__all__ = [
    "MATCH_STATISTICS",
    "DomainMeans",
    "Heterogeneity",
    "MatchedComparison",
    "SimulatedDamage",
    "cluster_mean_se",
    "cochran_q",
    "corrected_cv",
    "cv_lower_bound",
    "heterogeneity",
    "matched_comparison",
    "selectivity",
    "simulate_damage",
]


# ----------------------------------------------------------------------------- damage and its se
@dataclass(frozen=True)
class DomainMeans:
    """Per-domain mean of per-token values and its standard error.

    mean [..., G] and se [..., G] (units of the values, nats for loss differences; nan for a domain
    without tokens, se nan for a domain with one cluster); tokens [G] and clusters [G]: evaluated
    tokens and distinct clusters (documents) per domain.
    """

    mean: np.ndarray
    se: np.ndarray
    tokens: np.ndarray
    clusters: np.ndarray


def cluster_mean_se(values: np.ndarray, domain: np.ndarray, cluster: np.ndarray, num_domains: int) -> DomainMeans:
    """Mean of `values` [..., N] over the tokens of each domain, with its cluster-robust standard
    error (clusters: `cluster` [N], e.g. document ids; a cluster is keyed by (domain, cluster)).

    With S_g the sum and n_g the size of cluster g of domain d, n_d = sum_g n_g, G_d clusters:
        mean_d = sum_g S_g / n_d,   se_d^2 = G_d/(G_d - 1) * sum_g (S_g - n_g mean_d)^2 / n_d^2
    (the CR1 sandwich variance of a mean; with one token per cluster it is s^2/n with ddof=1).
    Vectorized over the leading axes of `values`.
    """
    values = np.asarray(values, dtype=np.float64)
    domain = np.asarray(domain, dtype=np.int64).reshape(-1)
    cluster = np.asarray(cluster, dtype=np.int64).reshape(-1)
    n = domain.size
    if values.shape[-1] != n or cluster.size != n:
        raise ValueError(
            f"values [..., {values.shape[-1]}], domain [{n}] and cluster [{cluster.size}] "
            "must have the same number of tokens"
        )
    if n and (domain.min() < 0 or domain.max() >= num_domains):
        raise ValueError(f"domain ids must lie in [0, {num_domains})")
    lead = values.shape[:-1]
    if n == 0:
        nan = np.full(lead + (num_domains,), np.nan)
        zeros = np.zeros(num_domains, dtype=np.int64)
        return DomainMeans(nan, nan.copy(), zeros, zeros.copy())
    # Sort tokens by (domain, cluster): clusters are contiguous runs, domains contiguous runs of clusters.
    order = np.lexsort((cluster, domain))
    d_sorted, c_sorted = domain[order], cluster[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (d_sorted[1:] != d_sorted[:-1]) | (c_sorted[1:] != c_sorted[:-1])
    starts = np.flatnonzero(new)
    sums = np.add.reduceat(values[..., order], starts, axis=-1)  # [..., clusters]
    sizes = np.diff(np.append(starts, n)).astype(np.float64)  # [clusters]
    g_domain = d_sorted[starts]  # [clusters]
    tokens = np.bincount(domain, minlength=num_domains)
    clusters = np.bincount(g_domain, minlength=num_domains)

    def per_domain(x):  # [..., clusters] -> [..., G]
        out = np.zeros(x.shape[:-1] + (num_domains,))
        for d in range(num_domains):
            out[..., d] = x[..., g_domain == d].sum(axis=-1)
        return out

    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(tokens > 0, per_domain(sums) / tokens, np.nan)
        resid = sums - sizes * mean[..., g_domain]
        factor = np.where(clusters > 1, clusters / np.maximum(clusters - 1, 1), np.nan)
        se = np.sqrt(factor * per_domain(resid**2) / np.maximum(tokens, 1) ** 2)
    se = np.where(tokens > 0, se, np.nan)
    return DomainMeans(mean, se, tokens.astype(np.int64), clusters.astype(np.int64))


# ----------------------------------------------------------------------------- selectivity
def _check_table(damage: np.ndarray, damage_se: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    damage = np.asarray(damage, dtype=np.float64)
    damage_se = np.asarray(damage_se, dtype=np.float64)
    if damage.ndim < 2 or damage.shape != damage_se.shape:
        raise ValueError(f"damage {damage.shape} and damage_se {damage_se.shape} must be equal shapes [..., G, U]")
    return damage, damage_se


def corrected_cv(damage: np.ndarray, damage_se: np.ndarray, *, clip: bool = True) -> np.ndarray:
    """Noise-corrected coefficient of variation of each unit's damage across domains, over sqrt(G).

    damage, damage_se [..., G, U] (nats) -> [..., U] (dimensionless):
        v = var_d(damage, ddof=1) - mean_d(damage_se^2)    (estimates the between-domain variance)
        cv = sqrt(max(v, 0)) / mean_d(damage) / sqrt(G)
    0 when the unit hurts every domain equally; 1 when it hurts one domain only (damage x, 0, .., 0);
    above 1 only when some domains gain from the knockout. Its expectation does not move with the
    damage size (sampling noise is subtracted, not divided by the damage): for an equal-damage unit
    the median is 0 at any damage (P(v <= 0) = P(chi^2_{G-1} <= G-1) > 1/2), though its upper tail
    widens as the damage shrinks towards the noise. nan when mean_d(damage) <= 0, G < 2, or a se is nan.
    `clip=False` returns sign(v) sqrt(|v|) / mean / sqrt(G) instead (same order where v > 0, and
    units below the noise keep their order instead of tying at 0; used to rank).
    """
    damage, damage_se = _check_table(damage, damage_se)
    d = damage.shape[-2]
    if d < 2:
        return np.full(damage.shape[:-2] + damage.shape[-1:], np.nan)
    mean = damage.mean(axis=-2)
    v = damage.var(axis=-2, ddof=1) - (damage_se**2).mean(axis=-2)
    root = np.sqrt(np.maximum(v, 0.0)) if clip else np.sign(v) * np.sqrt(np.abs(v))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, root / mean / np.sqrt(d), np.nan)


def cochran_q(damage: np.ndarray, damage_se: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cochran's Q test that a unit's true damage is equal across domains.

    damage, damage_se [..., G, U] -> (Q [..., U], p-value [..., U]): with w_d = 1/se_d^2 and
    m = sum w_d damage_d / sum w_d, Q = sum_d w_d (damage_d - m)^2, referred to chi^2 with G - 1
    degrees of freedom (exact for normal damage estimates with known se; the per-domain means of
    thousands of tokens are close to normal). Its null distribution does not depend on the damage.
    nan where a se is nan or 0.
    """
    damage, damage_se = _check_table(damage, damage_se)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(damage_se > 0, 1.0 / damage_se**2, np.nan)
        m = (w * damage).sum(axis=-2, keepdims=True) / w.sum(axis=-2, keepdims=True)
        q = (w * (damage - m) ** 2).sum(axis=-2)
    df = damage.shape[-2] - 1
    p = stats.chi2.sf(q, df) if df > 0 else np.full_like(q, np.nan)
    return q, np.where(np.isfinite(q), p, np.nan)


def _noncentrality_lower(q: np.ndarray, df: int, level: float) -> np.ndarray:
    """The lower `level` confidence bound of the noncentrality lambda of a noncentral chi^2_df
    observed at q: the lambda with P(chi^2_df(lambda) <= q) = level; 0 where q is below the central
    quantile. Vectorized bisection (the cdf decreases in lambda)."""
    q = np.asarray(q, dtype=np.float64)
    crit = stats.chi2.ppf(level, df)
    positive = np.isfinite(q) & (q > crit)
    qq = np.where(positive, q, crit + 1.0)
    lo, hi = np.zeros_like(qq), np.maximum(qq, 1.0) * 2.0  # P(chi^2_df(2q) <= q) < level for q > crit
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        above = stats.ncx2.cdf(qq, df, mid) > level
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return np.where(positive, 0.5 * (lo + hi), np.where(np.isfinite(q), 0.0, np.nan))


def cv_lower_bound(damage: np.ndarray, damage_se: np.ndarray, level: float = 0.95) -> np.ndarray:
    """A one-sided `level` lower confidence bound of the corrected CV, [..., U] from [..., G, U].

    The G domains are fixed, so the uncertainty is only the sampling noise: Cochran's Q is
    noncentral chi^2_{G-1}(lambda) with lambda = sum_d w_d (true_d - weighted mean)^2, w = 1/se^2.
    lambda_low, the lower bound of lambda given Q, becomes a between-domain variance
    tau2_low = lambda_low * G / ((G - 1) sum_d w_d) (exact when the se are equal), and
    cv_lower = sqrt(tau2_low) / mean_d(damage) / sqrt(G). It is 0 unless Q rejects equal damage at
    1 - level, so an equal-damage unit scores exactly 0 with probability `level` at every damage
    size; a well-measured specialist approaches `corrected_cv`. Biased low, more for noisier units
    (conservative). nan where `corrected_cv` is or a se is 0.
    """
    damage, damage_se = _check_table(damage, damage_se)
    d = damage.shape[-2]
    if d < 2:
        return np.full(damage.shape[:-2] + damage.shape[-1:], np.nan)
    mean = damage.mean(axis=-2)
    q, _ = cochran_q(damage, damage_se)
    lam = _noncentrality_lower(q, d - 1, level)
    with np.errstate(invalid="ignore", divide="ignore"):
        w_sum = (1.0 / damage_se**2).sum(axis=-2)
        tau2 = lam * d / ((d - 1) * w_sum)
        return np.where((mean > 0) & np.isfinite(tau2), np.sqrt(tau2) / mean / np.sqrt(d), np.nan)


@dataclass(frozen=True)
class Heterogeneity:
    """How unevenly each unit's damage falls on the domains; every field [..., U].

    mean_damage: mean_d(damage) (nats; the unweighted mean over domains, what matching uses);
    tau: sqrt(max(var_d(damage) - mean_d(se^2), 0)) (nats; the noise-corrected between-domain sd);
    cv: `corrected_cv` (tau / mean_damage / sqrt(G)); cv_lower: `cv_lower_bound` (95%);
    q, p_value: `cochran_q`; i2: max(0, (Q - (G-1)) / Q), the share of the spread across domains
    beyond noise (depends on the precision: more tokens, larger i2 for the same true spread).
    """

    mean_damage: np.ndarray
    tau: np.ndarray
    cv: np.ndarray
    cv_lower: np.ndarray
    q: np.ndarray
    p_value: np.ndarray
    i2: np.ndarray


def heterogeneity(damage: np.ndarray, damage_se: np.ndarray) -> Heterogeneity:
    """`Heterogeneity` of a damage table [..., G, U] with its standard errors (same shape)."""
    damage, damage_se = _check_table(damage, damage_se)
    d = damage.shape[-2]
    mean = damage.mean(axis=-2)
    if d > 1:
        tau = np.sqrt(np.maximum(damage.var(axis=-2, ddof=1) - (damage_se**2).mean(axis=-2), 0.0))
    else:
        tau = np.full_like(mean, np.nan)
    q, p = cochran_q(damage, damage_se)
    with np.errstate(invalid="ignore", divide="ignore"):
        i2 = np.where(q > 0, np.maximum(0.0, (q - (d - 1)) / q), 0.0)
    i2 = np.where(np.isfinite(q), i2, np.nan)
    return Heterogeneity(mean, tau, corrected_cv(damage, damage_se), cv_lower_bound(damage, damage_se), q, p, i2)


# ----------------------------------------------------------------------------- matched damage
MATCH_STATISTICS = ("cv_lower", "cv", "i2")


@dataclass(frozen=True)
class MatchedComparison:
    """Each expert's selectivity against the dense groups of its layer at matched damage.

    statistic: what is compared, one of `MATCH_STATISTICS`: "cv_lower" (`cv_lower_bound`, 95%;
    the default), "cv" (`corrected_cv`, ranked unclipped) or "i2" (`heterogeneity().i2`).
    Experts: score, mean_damage [L, E]; dense groups: dense_score, dense_mean_damage [L, groups]
    (mean damage = mean over domains, nats); matched [L, E, groups]: dense group g of layer l has a mean
    damage within [m / factor, m * factor] of expert e's mean damage m (> 0); n_matched [L, E];
    percentile [L, E]: share of matched groups scoring below the expert (ties count half), in [0, 1];
    p_value [L, E]: (1 + #matched groups scoring >= the expert) / (1 + n_matched), the one-sided
    p-value of "the expert is more domain-selective than a dense group of the same damage";
    matched_damage_median [L, E]: median mean damage of the matched groups (nats).
    percentile, p_value and matched_damage_median are nan where an expert has no positive mean
    damage, a nan score, or no matched group.
    """

    statistic: str
    score: np.ndarray
    mean_damage: np.ndarray
    dense_score: np.ndarray
    dense_mean_damage: np.ndarray
    matched: np.ndarray
    n_matched: np.ndarray
    percentile: np.ndarray
    p_value: np.ndarray
    matched_damage_median: np.ndarray
    factor: float


def _score(statistic: str, damage: np.ndarray, damage_se: np.ndarray) -> np.ndarray:
    check_choice("statistic", statistic, MATCH_STATISTICS)
    if statistic == "cv_lower":
        return cv_lower_bound(damage, damage_se)
    if statistic == "cv":
        return corrected_cv(damage, damage_se, clip=False)
    return heterogeneity(damage, damage_se).i2


def matched_comparison(
    damage: np.ndarray,
    damage_se: np.ndarray,
    dense_damage: np.ndarray,
    dense_damage_se: np.ndarray,
    *,
    factor: float = 2.0,
    statistic: str = "cv_lower",
) -> MatchedComparison:
    """Compare experts with the same layer's dense groups of similar mean damage.

    damage, damage_se [L, G, E] (experts), dense_damage, dense_damage_se [L, G, groups] (dense groups of
    the same L layers, on the same tokens), nats; factor > 1. See `MatchedComparison`.

    Why "cv_lower" by default: expert knockouts hit few tokens hard, dense groups many tokens
    lightly, so at equal mean damage an expert's damage is often noisier (larger se). The corrected
    CV is unbiased but its spread grows with the se, so noisier experts with equal damage on every
    domain outrank dense groups too often (simulated: 4 domains x 4,096 tokens, damage 0.05 nats,
    dense per-token sd 0.3, experts' 0.6 / 1.2: P(p < 0.05) = 0.16 / 0.34 with "cv", 0.04 / 0.05
    with "cv_lower", whose null is 0 with probability 0.95 whatever the se and the damage).
    """
    damage, damage_se = _check_table(damage, damage_se)
    dense_damage, dense_damage_se = _check_table(dense_damage, dense_damage_se)
    if damage.ndim != 3 or dense_damage.ndim != 3 or damage.shape[:2] != dense_damage.shape[:2]:
        raise ValueError(
            f"expert table {damage.shape} and dense table {dense_damage.shape} must be "
            "[L, G, E] and [L, G, groups] with the same L and G"
        )
    if not factor > 1:
        raise ValueError(f"factor={factor} must be > 1")
    score = _score(statistic, damage, damage_se)  # [L, E]
    dense_score = _score(statistic, dense_damage, dense_damage_se)  # [L, groups]
    m = damage.mean(axis=-2)  # [L, E]
    dm = dense_damage.mean(axis=-2)  # [L, groups]
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = dm[:, None, :] / m[:, :, None]  # [L, E, groups]
    matched = (m[:, :, None] > 0) & (ratio >= 1 / factor) & (ratio <= factor) & np.isfinite(dense_score)[:, None, :]
    n = matched.sum(axis=-1)
    ds, es = dense_score[:, None, :], score[:, :, None]
    below = (matched & (ds < es)).sum(axis=-1)
    ties = (matched & (ds == es)).sum(axis=-1)
    at_least = (matched & (ds >= es)).sum(axis=-1)
    ok = (n > 0) & np.isfinite(score)
    with np.errstate(invalid="ignore", divide="ignore"):
        percentile = np.where(ok, (below + 0.5 * ties) / n, np.nan)
        p_value = np.where(ok, (1 + at_least) / (1 + n), np.nan)
    med = np.full(m.shape, np.nan)
    for l, e in zip(*np.nonzero(ok)):
        med[l, e] = np.median(dm[l][matched[l, e]])
    return MatchedComparison(statistic, score, m, dense_score, dm, matched, n, percentile, p_value, med, float(factor))


# ----------------------------------------------------------------------------- simulation
@dataclass(frozen=True)
class SimulatedDamage:
    """Damage tables of simulated units with known truth.

    damage, damage_se [G, U] (nats; estimated from simulated per-token differences exactly as
    `cluster_mean_se` estimates real ones); true_damage [G, U] (the planted per-domain damage);
    tokens [G], clusters [G].
    """

    damage: np.ndarray
    damage_se: np.ndarray
    true_damage: np.ndarray
    tokens: np.ndarray
    clusters: np.ndarray


def _profile(profile: str | Sequence[float], num_domains: int, target: int) -> np.ndarray:
    """Relative per-domain damage with mean 1."""
    if isinstance(profile, str):
        if profile == "equal":
            return np.ones(num_domains)
        if profile == "single":
            w = np.zeros(num_domains)
            w[target] = num_domains
            return w
        raise ValueError(f"profile={profile!r}: use 'equal', 'single' or G relative weights")
    w = np.asarray(profile, dtype=np.float64)
    if w.shape != (num_domains,) or not w.mean() > 0:
        raise ValueError(f"profile weights must be [{num_domains}] with a positive mean")
    return w / w.mean()


def simulate_damage(
    num_units: int,
    mean_damage: float,
    *,
    num_domains: int = 4,
    profile: str | Sequence[float] = "equal",
    target: int = 0,
    tokens_per_domain: int = 4096,
    token_sd: float = 0.3,
    doc_len: int = 1,
    doc_sd: float = 0.0,
    rng: np.random.Generator | int | None = None,
) -> SimulatedDamage:
    """Simulate knockouts of `num_units` units with known per-domain damage.

    True damage of domain d: mean_damage * w_d with w the `profile` (mean 1 over domains): "equal"
    (w = 1: hurts every domain alike), "single" (w = G on domain `target`, 0 elsewhere), or G
    relative weights. Each domain has `tokens_per_domain` tokens in documents of `doc_len` tokens;
    a token's loss difference is true damage + a document effect N(0, doc_sd^2) shared by the
    document's tokens + N(0, token_sd^2) (nats). The tables are reduced by `cluster_mean_se` with
    documents as clusters, as real knockouts are. Pure numpy.
    """
    rng = np.random.default_rng(rng)
    if tokens_per_domain < 1 or doc_len < 1 or num_units < 1:
        raise ValueError("num_units, tokens_per_domain and doc_len must be >= 1")
    w = _profile(profile, num_domains, target)
    true = np.repeat((mean_damage * w)[:, None], num_units, axis=1)  # [G, U]
    n = num_domains * tokens_per_domain
    domain = np.repeat(np.arange(num_domains), tokens_per_domain)
    doc = np.tile(np.arange(tokens_per_domain) // doc_len, num_domains)
    n_docs = int(doc.max()) + 1
    values = rng.normal(0.0, token_sd, size=(num_units, n))
    values += true.T[:, domain]
    if doc_sd > 0:
        values += rng.normal(0.0, doc_sd, size=(num_units, num_domains, n_docs))[:, domain, doc]
    res = cluster_mean_se(values, domain, doc, num_domains)
    return SimulatedDamage(res.mean.T.copy(), res.se.T.copy(), true, res.tokens, res.clusters)


# ----------------------------------------------------------------------------- legacy
def selectivity(damage: np.ndarray, min_damage: float = 1e-6) -> np.ndarray:
    """Legacy (damage-dependent) selectivity, [..., U] from damage [..., G, U] (nats).

    With g = max(damage, 0): (max_d g - mean_d g) / mean_d g / (G - 1), in [0, 1]; nan when the
    mean damage is below `min_damage` or G = 1. Noise alone makes it positive and the smaller the
    damage the larger: an equal-damage unit scores a median of 0.03 / 0.15 / 0.38 at mean damage
    0.05 / 0.01 / 0.003 nats (4 domains, 4,096 tokens each, per-token sd 0.3; 200 units simulated
    by `simulate_damage`), where `corrected_cv` has median 0 at all three. Use
    `corrected_cv` (with the damage's standard errors) and `matched_comparison` instead.
    """
    g = np.clip(np.asarray(damage, dtype=np.float64), 0.0, None)
    d = g.shape[-2]
    if d < 2:
        return np.full(g.shape[:-2] + g.shape[-1:], np.nan)
    mean = g.mean(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > min_damage, (g.max(axis=-2) - mean) / mean / (d - 1), np.nan)
