"""Synthetic domains with a known ground truth: one first-order Markov chain per domain.

Legend: V process vocabulary (token ids 0..V-1; EOS is V), D domains, K successors per state.

The vocabulary is cut into D contiguous blocks. Domain d has a private chain whose successors all
lie in block d, and every domain shares one chain whose successors range over the whole vocabulary.
At each step domain d follows the shared chain with probability `overlap`, its private chain
otherwise (the first token likewise: uniform over V, or uniform over block d). Hence
- overlap = 0: domain d only ever emits tokens of block d (disjoint token sets and transitions);
- overlap = 1: every domain is the same process.
`transition_matrix` gives the exact [V, V] matrix of each domain, for planted experiments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe.data.config import DataConfig, SyntheticSourceConfig
from moe.data.corpus import TokenCorpus
from moe.data.errors import DataError
from moe.data.sources import register_source


@dataclass(frozen=True)
class MarkovProcess:
    """The ground truth. Successor tables are sparse: K (id, probability) pairs per state."""

    shared_next_VK: np.ndarray  # int64 [V, K] successors over the whole vocabulary
    shared_prob_VK: np.ndarray  # float64 [V, K], rows sum to 1
    private_next_DVK: np.ndarray  # int64 [D, V, K] successors inside block d
    private_prob_DVK: np.ndarray  # float64 [D, V, K]
    blocks: list[tuple[int, int]]  # block d = token ids [lo, hi)
    overlap: float

    @property
    def vocab_size(self) -> int:
        return self.shared_next_VK.shape[0]

    def initial_distribution(self, d: int) -> np.ndarray:
        """float64 [V]: distribution of a document's first token in domain d."""
        V = self.vocab_size
        lo, hi = self.blocks[d]
        p = np.full(V, self.overlap / V)
        p[lo:hi] += (1.0 - self.overlap) / (hi - lo)
        return p

    def transition_matrix(self, d: int) -> np.ndarray:
        """float64 [V, V]: P(next = j | current = i) in domain d (dense; for small V)."""
        V = self.vocab_size
        P = np.zeros((V, V))
        rows = np.arange(V)[:, None]
        np.add.at(P, (rows, self.shared_next_VK), self.overlap * self.shared_prob_VK)
        np.add.at(P, (rows, self.private_next_DVK[d]), (1.0 - self.overlap) * self.private_prob_DVK[d])
        return P


def _blocks(V: int, D: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, V, D + 1).round().astype(int)
    return [(int(edges[d]), int(edges[d + 1])) for d in range(D)]


def build_process(cfg: SyntheticSourceConfig, seed: int) -> MarkovProcess:
    """The Markov chains of `cfg`, fixed by `seed` (the corpus seed)."""
    rng = np.random.default_rng([seed, 0x5E7])
    V, D, K = cfg.vocab_size, cfg.num_domains, cfg.branching
    # Dirichlet(0.5) rows: a few successors dominate, so the chain is learnable but not trivial.
    shared_next = np.stack([rng.choice(V, size=min(K, V), replace=False) for _ in range(V)])
    shared_prob = rng.dirichlet(np.full(shared_next.shape[1], 0.5), size=V)
    blocks = _blocks(V, D)
    Kp = min(K, min(hi - lo for lo, hi in blocks))
    private_next = np.empty((D, V, Kp), dtype=np.int64)
    private_prob = np.empty((D, V, Kp))
    for d, (lo, hi) in enumerate(blocks):
        private_next[d] = np.stack([lo + rng.choice(hi - lo, size=Kp, replace=False) for _ in range(V)])
        private_prob[d] = rng.dirichlet(np.full(Kp, 0.5), size=V)
    return MarkovProcess(
        shared_next.astype(np.int64), shared_prob, private_next, private_prob, blocks, float(cfg.overlap)
    )


def _sample_next(rng: np.random.Generator, state: np.ndarray, nxt: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """One step for a batch of chains: state [N] -> next state [N] (inverse-CDF on K successors)."""
    cdf = np.cumsum(prob[state], axis=1)
    k = (rng.random(len(state))[:, None] > cdf).sum(axis=1)
    k = np.minimum(k, nxt.shape[1] - 1)  # guards the rounding of cdf[-1] slightly below 1
    return nxt[state, k]


def sample_domain(process: MarkovProcess, d: int, lengths: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Documents of domain d with the given lengths; all documents advance together per step."""
    N, L = lengths.size, int(lengths.max())
    out = np.empty((N, L), dtype=np.int64)
    state = rng.choice(process.vocab_size, size=N, p=process.initial_distribution(d))
    out[:, 0] = state
    for t in range(1, L):
        shared = _sample_next(rng, state, process.shared_next_VK, process.shared_prob_VK)
        private = _sample_next(rng, state, process.private_next_DVK[d], process.private_prob_DVK[d])
        state = np.where(rng.random(N) < process.overlap, shared, private)
        out[:, t] = state
    return [out[i, : lengths[i]].copy() for i in range(N)]


def domain_names(num_domains: int) -> list[str]:
    """Zero-padded so that sorting by name keeps the numeric order."""
    width = max(2, len(str(num_domains - 1)))
    return [f"syn{d:0{width}d}" for d in range(num_domains)]


def validate(cfg: DataConfig) -> None:
    """Checks of `data.synthetic` (run by `moe.data.config.validate` when this source is selected)."""
    s = cfg.synthetic
    if not 0.0 <= s.overlap <= 1.0:
        raise DataError(f"data.synthetic.overlap={s.overlap} must lie in [0, 1]")
    if s.num_domains < 1 or s.vocab_size < s.num_domains:
        raise DataError(
            f"data.synthetic needs num_domains >= 1 and vocab_size >= num_domains (got {s.num_domains}, {s.vocab_size})"
        )
    if s.vocab_size > 65535:
        raise DataError("data.synthetic.vocab_size must be at most 65535")
    if s.doc_len < 2 or s.tokens_per_domain < 2 * s.doc_len:
        raise DataError(
            f"data.synthetic.tokens_per_domain={s.tokens_per_domain} must be at least "
            f"2 * doc_len={2 * s.doc_len} (a domain needs two documents to split) and doc_len >= 2"
        )
    if s.branching < 1:
        raise DataError("data.synthetic.branching must be at least 1")


# Token ids, not text: data.tokenizer and data.vocab_size do not apply.
@register_source("synthetic", validate=validate, text=False)
def load_synthetic(cfg: DataConfig) -> TokenCorpus:
    """Token documents of every synthetic domain (deterministic given `cfg`, incl. corpus_seed)."""
    s = cfg.synthetic
    process = build_process(s, cfg.corpus_seed)
    names = domain_names(s.num_domains)
    docs = []
    for d in range(s.num_domains):
        rng = np.random.default_rng([cfg.corpus_seed, 0xD0C, d])
        lengths = []
        total = 0
        while total < s.tokens_per_domain:
            n = int(rng.integers(max(1, s.doc_len // 2), s.doc_len + s.doc_len // 2 + 1))
            n = min(n, s.tokens_per_domain - total)
            lengths.append(n)
            total += n
        if len(lengths) >= 2 and lengths[-1] < 2:  # fold a 1-token tail into the previous document
            lengths[-2] += lengths.pop()
        docs.append(sample_domain(process, d, np.asarray(lengths), rng))
    origin = {
        n: f"markov(vocab={s.vocab_size}, overlap={s.overlap}, branching={s.branching}, corpus_seed={cfg.corpus_seed})"
        for n in names
    }
    return TokenCorpus(names, docs, source="synthetic", origin=origin)
