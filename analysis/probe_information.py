"""How much of the domain information in a router's input the routing uses: a held-out linear probe
(pure numpy + scipy's L-BFGS; bits throughout).

A router scores experts with a linear map of its input x [D] (the hidden state each MoE layer
receives, `analysis.probes.capture_layer_inputs`), so it can only route on domain information that
x carries. How much x carries is measured with a multinomial logistic-regression probe
q(d | x) = softmax_d(standardize(x) @ W + b), fitted on the tokens of some documents and scored on
the tokens of held-out documents (K folds stratified by domain, every document held out once;
`analysis.heldout.document_folds`):

    probe bits = H(D) - CE,   CE = -mean over held-out tokens of log2 q(d | x)        (bits per token)

H(D) is the plug-in entropy of the scored tokens' domains. The probe bits are a lower bound on
I(D;X) up to the probe's misfit (a linear probe on finite data): the held-out cross-entropy of any
q is >= H(D|X). Documents are the unit because a document's tokens share a topic and a style: a
probe scored on held-out *tokens* of training documents learns each document's region of x and
calls it the domain (an input that carries only per-document offsets then scores positive bits);
on held-out documents those offsets carry nothing and the estimate is <= 0 in expectation. It can
be < 0 (the probe overfits, or the training folds' domain mix differs from the held-out one): it is
reported as is, never clipped.

Reading it next to I(D;E): `routing_use` = I(D;E) / probe bits is the share of the input's domain
information that the routing carries. A router that uses little of a strongly domain-coded input
(high probe bits, low I(D;E), low routing_use) behaves like an ensemble even when its I(D;E) is
above the document null: the domain is there to be read and the router does not sort by it
(routers are linear, so hidden-state similarity explains expert-usage similarity: "Myth of Expert
Specialization", arXiv 2604.09780). A routing_use near 1 means the routing carries about all the
domain information its input has (a specialist, within what the input allows); low probe bits
mean the input itself is domain-blind, and a low I(D;E) then says nothing about the router.

Legend as in `moe/__init__.py`: N tokens, D model dim, G domains, M documents, R bootstrap
resamples; folds are spelled out. In H(D), I(D;X) and I(D;E), D, X and E name the domain, input
and expert variables, not shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cholesky, solve_triangular
from scipy.optimize import minimize

from analysis.heldout import document_folds
from analysis.information import doc_index, entropy
from analysis.registry import MeasureResult
from analysis.statistics import stratified_doc_bootstrap
from analysis.validation import RngLike, as_labels, as_rng, positive_int

__all__ = [
    "DEFAULT_L2_PER_FEATURE",
    "LinearProbe",
    "ProbeInformation",
    "fit_linear_probe",
    "probe_domain_information",
    "routing_use",
]

# Default ridge of the held-out probe, per feature: l2 = DEFAULT_L2_PER_FEATURE * D. The penalty
# (l2 / 2) ||W||^2 on the standardized-feature weights is added to the *summed* training
# cross-entropy (nats), scikit-learn's LogisticRegression(C = 1 / l2); per token it is a weight
# decay of D / N_train. Why it grows with D: see `probe_domain_information`.
DEFAULT_L2_PER_FEATURE = 1.0

_LN2 = math.log(2.0)
# Rows of the training fold that estimate the preconditioner of `fit_linear_probe`.
_PRECONDITION_ROWS = 4096
# A fit counts as converged when its largest preconditioned gradient entry (Hessian ~ identity, so
# this is ~ the distance to the optimum) is below this: float32 fits end in a line-search stop at
# ~1e-5, which leaves the loss within ~1e-10 nats of its minimum.
_CONVERGED_GRADIENT = 1e-4


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """A fitted multinomial logistic-regression probe on standardized features.

    mean [D], scale [D]: the training tokens' feature mean and standard deviation (1 where a feature
    is constant); weight [D, G], bias [G]: q(class | x) = softmax((x - mean) / scale @ weight + bias).
    iterations: L-BFGS iterations used; converged: L-BFGS reported success, or stopped with its
    largest (preconditioned) gradient entry below 1e-4 (float32 fits end in a line-search stop).
    """

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    iterations: int
    converged: bool

    def log_proba(self, x_ND: np.ndarray) -> np.ndarray:
        """Natural-log class probabilities [N, G] of inputs x [N, D]."""
        x = np.asarray(x_ND)
        z = _logits(_standardize(x, self.mean, self.scale, _work_dtype(x)), self.weight, self.bias)
        return z - _logsumexp(z)


@dataclass(frozen=True, eq=False)
class ProbeInformation:
    """Domain information in the router's input, in bits per token, from a held-out linear probe.

    bits: H(D) - CE (may be < 0; not clipped); ci_low/ci_high: percentile interval of the
    domain-stratified document bootstrap (`confidence`, `n_bootstrap` replicates in `samples` [R]);
    p_value: one-sided, (1 + #{replicate <= 0}) / (1 + R), an approximate test of "the input carries
    no domain information a linear probe can read"; h_domain_bits: plug-in H(D) of the scored
    tokens; ce_bits: held-out cross-entropy -mean log2 q(d | x); accuracy: held-out share of tokens
    whose most probable domain is theirs; n_tokens, n_docs, n_folds, l2: how it was computed;
    converged: every fold's fit converged (`LinearProbe.converged`; False: raise max_iter).
    """

    bits: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float
    h_domain_bits: float
    ce_bits: float
    accuracy: float
    n_tokens: int
    n_docs: int
    n_folds: int
    l2: float
    n_bootstrap: int
    converged: bool
    samples: np.ndarray

    def as_measure_result(self, i_routing_bits: float | None = None) -> MeasureResult:
        """MeasureResult "probe_info": value = probe bits with its interval and p-value; details
        h_domain_bits, ce_bits, accuracy, n_tokens, n_docs, n_folds, l2, confidence, n_bootstrap,
        converged, and, when the routing's I(D;E) in bits is given, i_routing_bits and routing_use
        (None where nan, e.g. for probe bits <= 0; see `routing_use`).

        How it reads: high probe bits with a low routing_use mark a router that ignores a strongly
        domain-coded input (an ensemble, whatever I(D;E) does against its null); routing_use near 1
        a router that carries the domain information its input has; low probe bits an input with
        little domain information to route on."""
        details: dict[str, float | int | bool | None] = {
            "h_domain_bits": self.h_domain_bits,
            "ce_bits": self.ce_bits,
            "accuracy": self.accuracy,
            "n_tokens": self.n_tokens,
            "n_docs": self.n_docs,
            "n_folds": self.n_folds,
            "l2": self.l2,
            "confidence": self.confidence,
            "n_bootstrap": self.n_bootstrap,
            "converged": self.converged,
        }
        if i_routing_bits is not None:
            use = routing_use(i_routing_bits, self)
            details["i_routing_bits"] = float(i_routing_bits)
            details["routing_use"] = use if math.isfinite(use) else None
        return MeasureResult("probe_info", self.bits, self.ci_low, self.ci_high, None, self.p_value, details)


def routing_use(i_routing_bits: float, probe: ProbeInformation | float) -> float:
    """I(D;E) / probe bits: the share of the router input's domain information that routing carries.

    i_routing_bits: the layer's I(D;E) in bits per token, on the same tokens as the probe (prefer
    a bias-corrected value, Miller-Madow or the excess over the document null: the plug-in I(D;E)
    is biased up); probe: a `ProbeInformation` or its bits. nan when the probe finds <= 0 bits (no
    readable domain information: the ratio means nothing) or I(D;E) is not finite.

    Caveats: experts are a function of the input (E = top-k of linear scores of x), so the true
    I(D;E) <= I(D;X); but the probe bits are only a lower bound on I(D;X) (a linear probe, finite
    data, held-out misfit), so the ratio can exceed 1, notably when the probe bits are small, and
    it is a share of what a *linear* read-out finds, not of all the information x has. With
    K-counted tables I(D;E) is per assignment, not per token; keep the convention fixed when
    comparing layers or runs.
    """
    bits = probe.bits if isinstance(probe, ProbeInformation) else float(probe)
    i = float(i_routing_bits)
    if not (math.isfinite(bits) and bits > 0.0 and math.isfinite(i)):
        return float("nan")
    return i / bits


# ----------------------------------------------------------------------------- the probe fit
def _work_dtype(x: np.ndarray) -> type[np.floating]:
    """float64 for float64 inputs, float32 otherwise (hidden states come as float32 or lower: half
    the memory and time of float64, and the probe's loss is summed in float64 anyway)."""
    return np.float64 if x.dtype == np.float64 else np.float32


def _standardize(x_ND: np.ndarray, mean: np.ndarray, scale: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    out = np.asarray(x_ND, dtype=dtype) - mean.astype(dtype)
    out /= scale.astype(dtype)
    return out


def _logits(z_ND: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """[N, G] float64 logits of standardized inputs z [N, D]."""
    return (z_ND @ weight.astype(z_ND.dtype)).astype(np.float64) + bias


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=1, keepdims=True)
    return top + np.log(np.exp(z - top).sum(axis=1, keepdims=True))


def fit_linear_probe(
    x_ND: np.ndarray,
    label: np.ndarray,
    n_classes: int,
    *,
    l2: float,
    max_iter: int = 500,
    tol: float = 1e-6,
) -> LinearProbe:
    """Multinomial logistic regression of label [N] in [0, n_classes) on x [N, D], by L-BFGS.

    Features are standardized with these rows' mean and standard deviation; the objective is
    sum_i -log q(label_i | x_i) + (l2 / 2) ||W||^2 (nats; the bias is not penalized), i.e.
    scikit-learn's LogisticRegression(C=1/l2) on the standardized features for n_classes >= 3 (for
    2 classes scikit-learn fits one weight vector, which equals this fit at C=2/l2). Minimized from
    W = 0, b = log class frequencies (deterministic) with the objective divided by N and the weights
    preconditioned (see the code); stops when the largest gradient entry is below `tol`, the loss
    stops falling, or after `max_iter` iterations. A class absent from the rows gets bias ~ -inf
    (it is never predicted). Float64 inputs are fitted in float64, others in float32 (losses and
    gradients accumulated in float64). Cost: ~20 L-BFGS iterations of two [N, D] x [D, G] products
    each, plus a Cholesky factorization of a [D, D] matrix.
    """
    x = np.asarray(x_ND)
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {x.shape}")
    y = as_labels("label", label, n_classes)
    n, dim = x.shape
    if y.size != n or n == 0:
        raise ValueError(f"label must be [N={n}] with N >= 1, got {y.shape}")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    dtype = _work_dtype(x)
    mean = x.mean(axis=0, dtype=np.float64)
    scale = x.std(axis=0, dtype=np.float64)
    scale = np.where(scale > 1e-12 * np.maximum(np.abs(mean), 1.0), scale, 1.0)
    z = _standardize(x, mean, scale, dtype)
    g = int(n_classes)
    count = np.bincount(y, minlength=g).astype(np.float64)
    b0 = np.log(np.maximum(count, 1e-30) / n)
    b0 -= b0.mean()
    rows = np.arange(n)
    # Preconditioner: W = L^-T U with L L^T = (c z^T z + l2 I) / n, c = (1/G)(1 - 1/G) the softmax
    # variance at uniform predictions: a change of variables that makes the Hessian ~ identity
    # (hidden states are strongly correlated, and plain L-BFGS then needs ~10x the iterations);
    # the optimum is the same. z^T z is estimated from at most _PRECONDITION_ROWS evenly spaced rows:
    # a preconditioner only has to be roughly right, and the full Gram matrix would cost N D^2.
    c = (1.0 / g) * (1.0 - 1.0 / g) if g > 1 else 1.0
    sub = z[:: max(1, n // _PRECONDITION_ROWS)]
    a = (sub.T @ sub).astype(np.float64) * (c * n / sub.shape[0])
    a[np.diag_indices(dim)] += l2
    chol = cholesky(a / n, lower=True, check_finite=False)

    def to_weight(u: np.ndarray) -> np.ndarray:
        return solve_triangular(chol, u.reshape(dim, g), lower=True, trans="T", check_finite=False)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = to_weight(theta[: dim * g])
        logit = _logits(z, w, theta[dim * g :])
        logp = logit - _logsumexp(logit)
        loss = -logp[rows, y].sum() + 0.5 * l2 * float(np.sum(w * w))
        resid = np.exp(logp)
        resid[rows, y] -= 1.0
        grad_w = (z.T @ resid.astype(dtype)).astype(np.float64) + l2 * w
        grad_u = solve_triangular(chol, grad_w, lower=True, check_finite=False)
        grad = np.concatenate([grad_u.ravel(), resid.sum(axis=0)])
        return loss / n, grad / n

    theta0 = np.concatenate([np.zeros(dim * g), b0])
    res = minimize(
        objective,
        theta0,
        jac=True,
        method="L-BFGS-B",
        # float32 logits carry ~1e-7 relative noise: a finer ftol only makes the line search fail.
        options={"maxiter": int(max_iter), "gtol": float(tol), "ftol": 1e-12 if dtype == np.float64 else 1e-8},
    )
    theta = res.x
    return LinearProbe(
        mean=mean,
        scale=scale,
        weight=to_weight(theta[: dim * g]),
        bias=theta[dim * g :].copy(),
        iterations=int(res.nit),
        converged=bool(res.success) or float(np.abs(res.jac).max()) <= _CONVERGED_GRADIENT,
    )


# ----------------------------------------------------------------------------- held-out information
def probe_domain_information(
    x_ND: np.ndarray,
    domain: np.ndarray,
    doc: np.ndarray,
    n_domains: int,
    *,
    n_folds: int = 5,
    l2: float | None = None,
    max_iter: int = 500,
    rng: RngLike,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
) -> ProbeInformation:
    """Domain information in x (bits per token) as the held-out gain of a linear probe over H(D).

    x [N, D] the router inputs (float; converted from torch by the caller), domain [N] in [0, G),
    doc [N] integer document ids (one domain per document). Documents are dealt into
    min(n_folds, fewest documents of a present domain) folds stratified by domain; for each fold a
    `fit_linear_probe` on the other folds' tokens (features standardized with *their* statistics)
    scores the fold's tokens. probe bits = H(D) - CE with H(D) the plug-in entropy of the domains
    of all N tokens and CE = -mean log2 q(d | x) over them (each token scored once, by the probe
    that did not see its document). Only the domains present are classes.

    l2 (default None: `DEFAULT_L2_PER_FEATURE` * D = D; fixed, no nested cross-validation): the
    ridge on the summed training cross-entropy (scikit-learn's C = 1 / l2). Why it grows with D: an
    unregularized probe loses about D (G - 1) / (2 N ln 2) bits on held-out tokens, ~0.01 bits at
    D = 64, G = 4 and N ~ 1.3e4 training tokens but ~0.3 bits at D = 2048. There (N = 16k, G = 4,
    synthetic) a constant l2 = 1 scored -1.4 bits on inputs with ~0.3 bits of linearly readable
    domain information, l2 = D +0.29; on inputs without any, l2 = 1 gave -0.58 bits and l2 = D
    -0.13. On low-rank, correlated inputs (as hidden states are) l2 = D finds 2-5% fewer bits than
    l2 = 0.1 D. A misfit ridge, too weak or too strong, lowers the estimate (the conservative side
    of a lower bound); raise l2 when the bits come out < 0 on an input known to carry the domain.

    Interval: the per-document sums of held-out log2 q(d | x) are resampled within each domain
    (`stratified_doc_bootstrap`), H(D) is recomputed from each replicate's token counts; percentile
    interval at `confidence`. Deterministic given `rng`. Raises ValueError when a present domain
    has fewer than 2 documents (nothing could be held out).
    """
    x = np.asarray(x_ND)
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    d_all = as_labels("domain", domain, n_domains)
    n = d_all.size
    if n == 0 or x.shape[0] != n:
        raise ValueError(f"x [N, D] and domain [N] must have the same N >= 1, got {x.shape} and {d_all.shape}")
    doc_a = np.asarray(doc)
    if doc_a.shape != (n,) or not np.issubdtype(doc_a.dtype, np.integer):
        raise ValueError(f"doc must be integer ids [N={n}], got {doc_a.dtype} {doc_a.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x holds non-finite values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    positive_int("n_bootstrap", n_bootstrap)
    present, d = np.unique(d_all, return_inverse=True)  # classes = the domains present
    d = d.reshape(-1)
    g = present.size
    _, doc_of, doc_domain = doc_index(doc_a, d)
    m = doc_domain.size
    per_domain = np.bincount(doc_domain, minlength=g)
    if per_domain.min() < 2:
        raise ValueError("every domain needs at least 2 documents so that some can be held out")
    folds = int(min(positive_int("n_folds", n_folds), per_domain.min()))
    if folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    ridge = DEFAULT_L2_PER_FEATURE * x.shape[1] if l2 is None else float(l2)
    if not ridge > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    fold_rng, boot_rng = as_rng(rng).spawn(2)
    fold = document_folds(doc_domain, folds, fold_rng)[doc_of]  # [N]

    log2q = np.empty(n)  # held-out log2 q(d_i | x_i)
    correct = np.zeros(n, dtype=bool)
    converged = True
    for f in range(folds):
        train, test = fold != f, fold == f
        probe = fit_linear_probe(x[train], d[train], g, l2=ridge, max_iter=max_iter)
        converged &= probe.converged
        logp = probe.log_proba(x[test])
        log2q[test] = logp[np.arange(logp.shape[0]), d[test]] / _LN2
        correct[test] = logp.argmax(axis=1) == d[test]

    h = entropy(np.bincount(d, minlength=g))
    ce = float(-log2q.mean())
    bits = h - ce
    # Bootstrap: documents resampled within their domain; H(D) and CE recomputed per replicate.
    doc_log2q = np.bincount(doc_of, weights=log2q, minlength=m)  # [M]
    doc_tokens = np.bincount(doc_of, minlength=m).astype(np.float64)  # [M]
    doc_domain_tokens = np.zeros((m, g))
    doc_domain_tokens[np.arange(m), doc_domain] = doc_tokens
    mult = stratified_doc_bootstrap(doc_domain, n_bootstrap, boot_rng)  # [R, M]
    tokens_rg = mult @ doc_domain_tokens  # [R, G]
    p_rg = tokens_rg / tokens_rg.sum(axis=1, keepdims=True)
    h_r = -(p_rg * np.log2(np.where(p_rg > 0, p_rg, 1.0))).sum(axis=1)
    samples = h_r + (mult @ doc_log2q) / (mult @ doc_tokens)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    p = float((1 + np.count_nonzero(samples <= 0.0)) / (1 + samples.size))
    return ProbeInformation(
        bits=float(bits),
        ci_low=float(low),
        ci_high=float(high),
        confidence=float(confidence),
        p_value=p,
        h_domain_bits=float(h),
        ce_bits=ce,
        accuracy=float(correct.mean()),
        n_tokens=int(n),
        n_docs=int(m),
        n_folds=folds,
        l2=ridge,
        n_bootstrap=int(n_bootstrap),
        converged=bool(converged),
        samples=samples,
    )
