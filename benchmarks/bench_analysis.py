"""Time the specialization statistics on a synthetic routing record of realistic size.

Default: 1e7 routed tokens of one layer (K=2, E=8, D=4, V=4096, ~10k documents). Prints seconds per
part; the target is < 10 s for tables + measures on a 2-core CPU. The document null and bootstrap
run on the per-document tables ([M, E]), so their cost does not grow with the number of records;
the held-out I(D;E|T) (`analysis.heldout`) fits and scores its folds once over the records and
bootstraps the per-document gains.

    python benchmarks/bench_analysis.py [--records 10000000] [--replicates 200]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from allocator import add_allocator_flag, set_allocator

from analysis.committees import committee_evidence
from analysis.heldout import context_keys, heldout_conditional_information
from analysis.information import (
    assignment_weights,
    conditional_mutual_information,
    conditional_mutual_information_mm,
    contingency,
    doc_expert_counts,
    joint_from_docs,
    mutual_information,
    normalized_mutual_information,
    normalized_mutual_information_mm,
    token_domain_expert_counts,
)
from analysis.metrics import coactivation, consecutive_expert_rate, domain_specialization
from analysis.paths import path_information
from analysis.records import LayerRecords, RoutingRecords
from analysis.statistics import bootstrap_ci, permutation_null


def synthetic_records(
    n: int, n_docs: int, k: int, n_experts: int, n_domains: int, vocab: int, seed: int
) -> dict[str, np.ndarray]:
    """Routing records with documents of one domain, skewed domain-shifted token distributions and
    routing that mixes token preference (60%), domain preference (20%) and noise (20%)."""
    assert k == 2, "the generator draws a distinct second expert"
    rng = np.random.default_rng(seed)
    lengths = rng.multinomial(n - n_docs, np.full(n_docs, 1.0 / n_docs)) + 1  # >= 1 token per doc
    doc_domain = rng.integers(0, n_domains, n_docs)
    doc = np.repeat(rng.permutation(10 * n_docs)[:n_docs], lengths)  # arbitrary ids, stream order
    domain = np.repeat(doc_domain, lengths)
    rank = (vocab * rng.random(n) ** 3).astype(np.int64)  # Zipf-like: low ranks frequent
    token = (rank + domain * (vocab // (2 * n_domains))) % vocab  # domains shift their vocabulary
    u = rng.random(n)
    token_expert = rng.integers(0, n_experts, vocab)
    noise = rng.integers(0, n_experts, n)
    top1 = np.where(u < 0.6, token_expert[token], np.where(u < 0.8, domain % n_experts, noise))
    top2 = (top1 + 1 + rng.integers(0, n_experts - 1, n)) % n_experts
    g1 = 0.5 + 0.5 * rng.random(n)
    return {
        "doc": doc,
        "domain": domain,
        "token": token,
        "experts": np.stack([top1, top2], axis=1),
        "gates": np.stack([g1, 1.0 - g1], axis=1),
    }


def two_layer_records(r: dict[str, np.ndarray], n_experts: int) -> RoutingRecords:
    """The records as layer 0 and a second layer that shifts both experts by the token id mod 3 (the
    pair stays distinct), for the path measures."""
    layer0 = r["experts"]
    layer1 = (layer0 + (r["token"] % 3)[:, None]) % n_experts
    kept = np.ones(layer0.shape, dtype=bool)
    gates = r["gates"].astype(np.float32)
    return RoutingRecords(
        ["d0", "d1", "d2", "d3"],
        r["token"],
        r["domain"],
        r["doc"],
        np.zeros_like(r["token"]),
        [LayerRecords(layer0, gates, kept), LayerRecords(layer1, gates, kept)],
        n_experts,
        layer0.shape[1],
    )


@contextmanager
def timed(label: str, log: dict[str, float]) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    log[label] = time.perf_counter() - t0
    print(f"  {label:<44s} {log[label]:7.2f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--replicates", type=int, default=200)
    ap.add_argument(
        "--heldout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the held-out I(D;E|T) (5 folds, --replicates bootstrap replicates)",
    )
    ap.add_argument("--seed", type=int, default=0)
    add_allocator_flag(ap)
    args = ap.parse_args()
    allocator = set_allocator(args.default_allocator)
    k, e, d, v = 2, 8, 4, 4096

    t0 = time.perf_counter()
    r = synthetic_records(args.records, args.docs, k, e, d, v, args.seed)
    print(
        f"generated {args.records:,} records (K={k}, E={e}, D={d}, V={v}, {args.docs:,} docs) "
        f"in {time.perf_counter() - t0:.2f} s (not counted); malloc: {allocator}"
    )

    log: dict[str, float] = {}
    print("tables + measures:")
    with timed("doc table [M, E]", log):
        docs = doc_expert_counts(r["doc"], r["domain"], r["experts"], d, e)
    with timed("joint [D, E] from doc table", log):
        joint = joint_from_docs(docs.doc_domain, docs.counts, d)
    with timed("token x expert table [V, E]", log):
        tok_e = contingency(r["token"], r["experts"], v, e)
    with timed("token x domain x expert sparse table", log):
        cube = token_domain_expert_counts(r["token"], r["domain"], r["experts"], v, d, e)
    with timed("NMI + Miller-Madow NMI", log):
        nmi, nmi_mm = normalized_mutual_information(joint), normalized_mutual_information_mm(joint)
    with timed("I(T;E)", log):
        i_te = mutual_information(tok_e)
    with timed("I(D;E|T) + Miller-Madow", log):
        cmi, cmi_mm = conditional_mutual_information(cube), conditional_mutual_information_mm(cube)
    core = sum(log.values())
    print(f"  {'= tables + measures':<44s} {core:7.2f} s   (target < 10 s)")

    print("resampling (on the [M, E] doc table):")
    with timed(f"bootstrap CI, {args.replicates} replicates", log):
        ci = bootstrap_ci(docs, d, n_resamples=args.replicates, rng=args.seed)
    with timed(f"document permutation null, {args.replicates} replicates", log):
        null = permutation_null(docs, d, n_permutations=args.replicates, rng=args.seed)

    print("extras:")
    with timed("gate-weighted doc table", log):
        # not bound to a name: an [N, K] array kept alive here would only crowd the later measures
        doc_expert_counts(
            r["doc"], r["domain"], r["experts"], d, e, weights=assignment_weights(r["gates"], "normalized_gate")
        )
    with timed("OLMoE domain specialization + co-activation", log):
        spec = domain_specialization(joint, k)
        coact = coactivation(r["experts"], e)
    with timed("Mixtral consecutive top-1 rate", log):
        rep = consecutive_expert_rate(r["experts"], r["doc"])
    held = None
    if args.heldout:
        with timed(f"held-out I(D;E|T), 5 folds, {args.replicates} bootstrap replicates", log):
            held = heldout_conditional_information(
                context_keys(r["token"]),
                r["domain"],
                r["doc"],
                r["experts"],
                d,
                e,
                n_resamples=args.replicates,
                rng=args.seed,
            )

    print("issue-22 measures (nulls and bootstraps included):")
    with timed(f"committee overlap, {args.replicates} permutations + bootstrap", log):
        committee = committee_evidence(
            docs, d, n_permutations=args.replicates, n_bootstrap=args.replicates, rng=args.seed
        )
    records = two_layer_records(r, e)
    paths = {}
    for mode in ("top1", "topk"):
        with timed(f"path I(D;path), 2 layers, {mode}, with held-out share", log):
            paths[mode] = path_information(
                records, d, mode=mode, n_permutations=args.replicates, n_bootstrap=args.replicates, rng=args.seed
            )
    print(f"  {'= every measure above':<44s} {sum(log.values()):7.2f} s   (target < 10 s)")

    print("results:")
    print(
        f"  NMI {nmi:.4f} (MM {nmi_mm:.4f}), 95% CI [{ci.low:.4f}, {ci.high:.4f}], "
        f"null mean {null.mean:.2e} q95 {null.q95:.2e}, p = {null.p_value:.4f}"
    )
    print(
        f"  I(T;E) {i_te:.4f} bits, I(D;E|T) {cmi:.4f} bits (MM {cmi_mm:.4f})"
        + (
            ""
            if held is None
            else f", held-out {held.estimate:.4f} bits [{held.ci_low:.4f}, {held.ci_high:.4f}], p = {held.p_value:.3f}"
        )
    )
    for mode, info in paths.items():
        print(
            f"  path ({mode}): NMI - null {info.excess:.4f}, {info.n_paths} paths; "
            f"committee overlap {committee.overlap:.3f} (null {committee.null_mean:.3f})"
        )
    print(
        f"  domain specialization max {np.nanmax(spec):.3f} (uniform {k / e:.3f}); "
        f"co-activation max {np.nanmax(coact):.3f} (uniform {(k - 1) / (e - 1):.3f}); "
        f"consecutive top-1 {rep:.3f}"
    )


if __name__ == "__main__":
    main()
