"""Packing documents into sequences, the infinite train stream, and the validation sequences.

Legend: B micro batch size, S seq_len, G = B * world_size (the global micro batch), I document
instances in an epoch (a document sampled twice is two instances).

The train stream is defined once for all ranks. Epoch e (seeded by (seed, e)) is a shuffled list
of document instances, each followed by its EOS, concatenated into one virtual token stream that is
cut into sequences of S+1 tokens overlapping by one (inputs [:-1], targets [1:]); the sequences are
then visited in a seeded random order. Every micro-step takes the next G sequences of that order;
rank r keeps rows [r*B, (r+1)*B). An epoch's tail of fewer than G sequences is skipped. The stream
is never materialized: a batch gathers its tokens from the document-major token array through the
epoch's instance table, so restoring a position costs one epoch layout (O(documents)), not a replay.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe.data.batch import Batch
from moe.data.errors import DataError


@dataclass(frozen=True)
class TokenStore:
    """Every document's tokens, document after document, each followed by one EOS.

    tokens      [N_tok] uint16 (vocab <= 65536) or int32
    offsets     int64 [N_doc + 1]: document i is tokens[offsets[i]:offsets[i+1]] (EOS last)
    doc_domain  int64 [N_doc]: domain index of each document
    """

    tokens: np.ndarray
    offsets: np.ndarray
    doc_domain: np.ndarray

    @classmethod
    def load(cls, directory: Path, doc_domain: np.ndarray) -> TokenStore:
        """Open tokens.npy / offsets.npy of a cache entry. The tokens are memory-mapped: ranks on one
        machine share the pages, and opening is instant at any corpus size."""
        tokens = np.load(directory / "tokens.npy", mmap_mode="r")
        offsets = np.load(directory / "offsets.npy")
        if offsets.size != doc_domain.size + 1 or offsets[-1] != tokens.size:
            raise DataError(f"token cache {directory} does not match its corpus; delete that directory")
        return cls(tokens, offsets, doc_domain)

    @property
    def doc_lengths(self) -> np.ndarray:
        """int64 [N_doc]: tokens per document including its EOS."""
        return np.diff(self.offsets)

    def gather(self, inst_doc: np.ndarray, inst_start: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and document ids at virtual stream positions `pos` (any shape).

        inst_doc [I] / inst_start [I] (ascending) describe a stream of document instances.
        """
        inst = np.searchsorted(inst_start, pos, side="right") - 1
        doc = inst_doc[inst]
        return self.tokens[self.offsets[doc] + (pos - inst_start[inst])], doc


@dataclass(frozen=True)
class EpochLayout:
    """One epoch of the train stream: instances in stream order and the sequence visiting order."""

    inst_doc: np.ndarray  # int64 [I]
    inst_start: np.ndarray  # int64 [I], stream offset of each instance
    seq_order: np.ndarray  # int64 [n_seq], sequence k starts at stream offset k * S

    @property
    def n_seq(self) -> int:
        return int(self.seq_order.size)


class TrainPlan:
    """Everything that defines the global train stream (shared by all ranks' `BatchStream`s)."""

    def __init__(
        self,
        store: TokenStore,
        train_docs: np.ndarray,
        weights: np.ndarray,
        *,
        seq_len: int,
        seed: int,
        fingerprint: str,
    ) -> None:
        self.store = store
        self.seq_len = seq_len
        self.seed = seed
        self.fingerprint = fingerprint
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        lengths = store.doc_lengths
        self._docs_by_domain = [train_docs[store.doc_domain[train_docs] == d] for d in range(self.weights.size)]
        self._tokens_by_domain = np.array([lengths[ds].sum() for ds in self._docs_by_domain], dtype=np.float64)
        for d, w in enumerate(self.weights):
            if w > 0 and self._tokens_by_domain[d] == 0:
                raise DataError(f"domain index {d} has mixture weight {w} but no train documents")
        self._epoch_tokens = float(lengths[train_docs].sum())
        self._layouts: dict[int, EpochLayout] = {}  # the last two epochs asked for (all ranks share them)

    def train_tokens_by_domain(self) -> list[int]:
        """Train tokens (with EOS) of each domain."""
        return [int(t) for t in self._tokens_by_domain]

    def upsampling(self) -> list[float]:
        """Per domain: how many times an epoch repeats its train tokens (w_d * epoch tokens / its
        tokens; 1 = each document once, < 1 = down-sampled, 0 for a weight-0 domain)."""
        return [float(w * self._epoch_tokens / n) if n else 0.0 for w, n in zip(self.weights, self._tokens_by_domain)]

    def layout(self, epoch: int) -> EpochLayout:
        """The layout of `epoch` (cached: each costs O(documents) to build)."""
        if epoch not in self._layouts:
            if len(self._layouts) >= 2:
                self._layouts.pop(min(self._layouts))
            self._layouts[epoch] = self._build_layout(epoch)
        return self._layouts[epoch]

    def _build_layout(self, epoch: int) -> EpochLayout:
        rng = np.random.default_rng([self.seed, 0xE90C, epoch])
        lengths = self.store.doc_lengths
        parts = []
        for d, w in enumerate(self.weights):
            if w == 0:
                continue
            docs = self._docs_by_domain[d]
            # Each domain contributes w_d of an epoch's tokens: whole copies of its documents, then
            # a seeded random subset for the fraction (up- or down-sampling by document).
            target = w * self._epoch_tokens
            copies = int(target // self._tokens_by_domain[d])
            rest = target - copies * self._tokens_by_domain[d]
            parts.append(np.tile(docs, copies))
            if rest > 0:
                perm = rng.permutation(docs)
                k = int(np.searchsorted(np.cumsum(lengths[perm]), rest)) + 1
                parts.append(perm[:k])
        inst_doc = rng.permutation(np.concatenate(parts))
        inst_len = lengths[inst_doc]
        inst_start = np.concatenate([[0], np.cumsum(inst_len)[:-1]]).astype(np.int64)
        n_seq = max(0, (int(inst_len.sum()) - 1) // self.seq_len)
        return EpochLayout(inst_doc, inst_start, rng.permutation(n_seq))

    def batch(self, layout: EpochLayout, rows: np.ndarray) -> Batch:
        """The sequences `rows` (indices into the epoch's sequences) as a Batch [len(rows), S]."""
        S = self.seq_len
        pos = rows[:, None] * S + np.arange(S + 1)  # [B, S+1]
        window, doc = self.store.gather(layout.inst_doc, layout.inst_start, pos)
        doc = doc[:, :-1]
        return Batch.from_numpy(window, self.store.doc_domain[doc], doc)


class BatchStream:
    """Infinite iterator of this rank's micro batches of the global train stream.

    Position = (epoch, sequences of that epoch consumed); `state_dict` / `load_state_dict` save and
    restore it as plain data, so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, plan: TrainPlan, *, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size={micro_batch_size} must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.plan = plan
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self._epoch = 0
        self._position = 0
        n_seq = plan.layout(0).n_seq
        if self.global_batch_size > n_seq:
            raise DataError(
                f"a global micro batch of {self.global_batch_size} sequences (micro_batch_size * world_size) "
                f"exceeds the {n_seq} sequences of one epoch; lower micro_batch_size or seq_len, or add data"
            )

    @property
    def global_batch_size(self) -> int:
        """G: sequences consumed by one micro-step across all ranks."""
        return self.micro_batch_size * self.world_size

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        G, B = self.global_batch_size, self.micro_batch_size
        layout = self.plan.layout(self._epoch)
        if self._position + G > layout.n_seq:
            self._epoch, self._position = self._epoch + 1, 0
            layout = self.plan.layout(self._epoch)
            if G > layout.n_seq:
                raise DataError(f"epoch {self._epoch} has {layout.n_seq} sequences, fewer than the global batch {G}")
        start = self._position + self.rank * B
        rows = layout.seq_order[start : start + B]
        self._position += G
        return self.plan.batch(layout, rows)

    def state_dict(self) -> dict:
        """Plain, picklable position of the stream (independent of rank and world size)."""
        return {"version": 1, "epoch": self._epoch, "position": self._position, "fingerprint": self.plan.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (from `state_dict`, possibly of another rank or world size)."""
        if state.get("fingerprint") != self.plan.fingerprint:
            raise DataError(
                "the saved data-stream state belongs to different data (corpus, tokenizer, seed, seq_len "
                "or mixture differ); resume with the data config and seed of the saved run"
            )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])


def stream_fingerprint(*parts: object) -> str:
    """Short hash of what defines a stream, stored in its state to refuse mismatched resumes."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def val_windows(
    store: TokenStore, docs: np.ndarray, *, seq_len: int, max_tokens: int, min_docs: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Validation sequences of one domain: its held-out documents `docs` (in that order) packed
    back to back, cut into n windows of S+1 tokens with stride S, n * S <= max_tokens.

    The budget is spread over documents: if the first m = min(min_docs, len(docs)) documents
    together overflow it, each of them contributes only its first `cap` tokens (the last one
    replaced by its EOS, as any truncated document ends), with `cap` the smallest that still fills
    the budget; so long documents cannot crowd the others out of a document-level statistic. m is
    lowered, not below 2, where a document would get less than one window (S+1 tokens). Otherwise
    documents enter whole, as many as fit.

    Returns windows [n, S+1] (token dtype) and doc ids [n, S] (int64). The documents in the
    validation set are `np.unique(doc_ids)`.
    """
    S = seq_len
    docs = np.asarray(docs, dtype=np.int64)
    lengths = store.doc_lengths[docs]
    need = (max_tokens // S) * S + 1  # stream tokens that fill the budget: n windows overlap by one
    m = min(min_docs, docs.size, max(2, need // (S + 1)))
    take = lengths
    if m >= 1 and int(lengths[:m].sum()) > need:
        docs, take = docs[:m], np.minimum(lengths[:m], _fill_cap(lengths[:m], need))
    n = min(max_tokens // S, max(0, (int(take.sum()) - 1) // S))
    if n == 0:
        return np.empty((0, S + 1), store.tokens.dtype), np.empty((0, S), np.int64)
    k = int(np.searchsorted(np.cumsum(take), n * S + 1)) + 1  # documents reaching into the windows
    parts = []
    for doc, t, length in zip(docs[:k].tolist(), take[:k].tolist(), lengths[:k].tolist()):
        o = int(store.offsets[doc])
        body = store.tokens[o : o + t]
        if t < length:  # a prefix: end it with the document's EOS
            body = np.concatenate([store.tokens[o : o + t - 1], store.tokens[o + length - 1 : o + length]])
        parts.append(body)
    stream = np.concatenate(parts)[: n * S + 1]
    owner = np.repeat(docs[:k], take[:k])[: n * S + 1]
    pos = np.arange(n)[:, None] * S + np.arange(S + 1)
    return np.ascontiguousarray(stream[pos]), np.ascontiguousarray(owner[pos[:, :-1]])


def _fill_cap(lengths: np.ndarray, need: int) -> int:
    """Smallest cap c >= 2 with sum(min(lengths, c)) >= need (lengths.sum() > need is given)."""
    lo, hi = 2, int(lengths.max())
    while lo < hi:
        mid = (lo + hi) // 2
        if int(np.minimum(lengths, mid).sum()) >= need:
            hi = mid
        else:
            lo = mid + 1
    return lo
