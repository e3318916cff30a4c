"""Prepared data: what a run trains and evaluates on, and its round trip through a run directory.

`PreparedData.save(run_dir)` writes `run_dir/data/` (manifest.json, documents.json, val.npz,
tokenizer/); `load_prepared(run_dir)` reads it back. Validation batches need only that directory;
the train stream also needs the token cache the manifest points to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe.data.batch import Batch
from moe.data.cache import corpus_dir, tokens_dir, write_json
from moe.data.config import as_data_config, resolve_cache_dir
from moe.data.corpus import TextCorpus
from moe.data.errors import DataError
from moe.data.split import mixture_weights
from moe.data.stream import BatchStream, TokenStore, TrainPlan
from moe.data.tokenizer import Tokenizer, load_tokenizer
from moe.validation import check_choice

FORMAT_VERSION = 1
RUN_SUBDIR = "data"


@dataclass(frozen=True)
class DocumentInfo:
    """One document of the corpus: its id (as in `Batch.doc`), domain, source id and split."""

    doc: int
    domain: str
    source: str
    split: str  # "train" | "val"


# ---- the prepared data ------------------------------------------------------------------------
class PreparedData:
    """A tokenized, split corpus ready to stream. Build with `prepare_data` or `load_prepared`.

    domains     sorted domain names; `Batch.domain` indexes this list
    tokenizer   encode(str) -> list[int], decode(ids) -> str, vocab_size, eos_id, save(dir)
    manifest    plain dict: corpus facts per domain, hashes, split sizes (see `split_counts`),
                tokenizer, config, seed, and the warnings raised while preparing
    documents   `DocumentInfo` per document id
    """

    def __init__(
        self,
        *,
        domains: list[str],
        tokenizer: Tokenizer,
        manifest: dict,
        seq_len: int,
        documents: list[DocumentInfo],
        val: dict[str, tuple[np.ndarray, np.ndarray]],
        store: TokenStore | None,
        plan: TrainPlan | None,
        texts: list[str] | None = None,
        corpus_dir: Path | None = None,
    ) -> None:
        self.domains = domains
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.seq_len = seq_len
        self.documents = documents
        self._val = val
        self._store = store
        self._plan = plan
        self._texts = texts
        self._corpus_dir = corpus_dir

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (the model's embedding rows)."""
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def train_stream(self, *, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> BatchStream:
        """This rank's infinite stream of train batches, each [micro_batch_size, seq_len]."""
        if self._plan is None:
            raise DataError(
                "these prepared data were loaded from a run directory without the token cache, so they "
                "have validation batches only; call prepare_data(cfg, seed=...) to stream train batches"
            )
        return BatchStream(self._plan, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size)

    def val_batches(self, *, batch_size: int, domain: str | None = None) -> list[Batch]:
        """Fixed validation batches [<= batch_size, seq_len] of one domain, or of all domains
        (domain order, then document order) when `domain` is None. At most
        `val_tokens_per_domain` input tokens per domain; the last batch may be smaller."""
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        names = self.domains if domain is None else [domain]
        for name in names:
            check_choice("domain", name, self.domains, error=DataError)
        windows = np.concatenate([self._val[n][0] for n in names]).astype(np.int64)
        docs = np.concatenate([self._val[n][1] for n in names])
        dom = np.concatenate([np.full(self._val[n][1].shape, self.domains.index(n), np.int64) for n in names])
        return [
            Batch.from_numpy(windows[i : i + batch_size], dom[i : i + batch_size], docs[i : i + batch_size])
            for i in range(0, windows.shape[0], batch_size)
        ]

    def split_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Documents and tokens per split and domain: {"train"|"val": {domain: {"documents": n,
        "tokens": n}}}.

        train: the train documents and their tokens (each with its EOS), what the stream draws
        from. val: what the validation batches hold, i.e. the documents with at least one token in
        them and their input positions (at most `val_tokens_per_domain`); held-out documents beyond
        that budget are not counted (the manifest's `split` has them as val_documents/val_tokens).
        """
        split = self.manifest["split"]
        out: dict[str, dict[str, dict[str, int]]] = {"train": {}, "val": {}}
        for name in self.domains:
            s = split[name]
            docs = s.get("val_documents_used")
            if docs is None:  # a manifest written before the count was recorded
                docs = int(np.unique(self._val[name][1]).size)
            out["train"][name] = {"documents": int(s["train_documents"]), "tokens": int(s["train_tokens"])}
            out["val"][name] = {"documents": int(docs), "tokens": int(s["val_tokens_used"])}
        return out

    def doc_tokens(self, doc: int) -> np.ndarray:
        """Token ids of document `doc` without its trailing EOS (int64 [n])."""
        if self._store is None:
            raise DataError("document tokens need the token cache; call prepare_data(cfg, seed=...)")
        o = self._store.offsets
        return self._store.tokens[o[doc] : o[doc + 1] - 1].astype(np.int64)

    def doc_text(self, doc: int) -> str:
        """The text of document `doc` as it entered the tokenizer (text sources only).

        Reference for inspection and the tests (decoding `doc_tokens` gives it back); the pipeline
        itself never reads the text again once tokenized."""
        if self._texts is None and self._corpus_dir is not None and (self._corpus_dir / "corpus.json").exists():
            self._texts = [d.text for d in TextCorpus.load(self._corpus_dir).documents]
        if self._texts is None:
            raise DataError("document texts are not available (synthetic source, or corpus not in the cache)")
        return self._texts[doc]

    def save(self, run_dir: str | Path) -> Path:
        """Write manifest.json, documents.json, val.npz and tokenizer/ into `run_dir/data/`;
        return that directory. `load_prepared(run_dir)` reads it back."""
        out = Path(run_dir) / RUN_SUBDIR
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "manifest.json", self.manifest)
        write_json(out / "documents.json", [[d.doc, d.domain, d.source, d.split] for d in self.documents])
        # Any: np.savez also takes allow_pickle: bool, so mypy checks a **dict of arrays against that too.
        arrays: dict[str, Any] = {}
        for i, name in enumerate(self.domains):
            arrays[f"windows_{i}"], arrays[f"docs_{i}"] = self._val[name]
        np.savez(out / "val.npz", **arrays)
        self.tokenizer.save(out / "tokenizer")
        return out


def load_prepared(run_dir: str | Path, *, cache_dir: str | Path | None = None) -> PreparedData:
    """Read what `PreparedData.save(run_dir)` wrote.

    Validation batches, the tokenizer, the manifest and the document table come from the run
    directory alone. If the token cache of that corpus and tokenizer is present (under `cache_dir`,
    else the cache recorded in the manifest), the train stream of the saved seed works too, so a
    run can resume from its directory.
    """
    root = Path(run_dir)
    directory = root / RUN_SUBDIR if (root / RUN_SUBDIR / "manifest.json").exists() else root
    if not (directory / "manifest.json").exists():
        raise DataError(
            f"{root} holds no prepared-data manifest ({RUN_SUBDIR}/manifest.json); "
            f"pass the directory a run saved its data into"
        )
    manifest = json.loads((directory / "manifest.json").read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{directory} was written by data format {manifest.get('format_version')}, this is "
            f"{FORMAT_VERSION}; prepare the data again"
        )
    tokenizer = load_tokenizer(directory / "tokenizer")
    domains = sorted(manifest["domains"])
    with np.load(directory / "val.npz") as z:
        val = {name: (z[f"windows_{i}"], z[f"docs_{i}"]) for i, name in enumerate(domains)}
    documents = [
        DocumentInfo(int(d), dom, src, sp) for d, dom, src, sp in json.loads((directory / "documents.json").read_text())
    ]
    cfg = as_data_config(manifest["config"])
    seq_len = cfg.seq_len
    cache = resolve_cache_dir(cache_dir if cache_dir is not None else manifest["cache"]["root"])
    tokens = tokens_dir(cache, manifest["corpus_sha256"], tokenizer.sha256)
    store = plan = None
    if (tokens / "offsets.npy").exists():
        doc_domain = np.array([domains.index(d.domain) for d in documents], dtype=np.int64)
        store = TokenStore.load(tokens, doc_domain)
        train_docs = np.array([d.doc for d in documents if d.split == "train"], dtype=np.int64)
        weights = mixture_weights(cfg.mixture, domains)  # recomputed exactly as prepare_data did
        plan = TrainPlan(
            store,
            train_docs,
            weights,
            seq_len=seq_len,
            seed=manifest["seed"],
            fingerprint=manifest["stream_fingerprint"],
        )
    return PreparedData(
        domains=domains,
        tokenizer=tokenizer,
        manifest=manifest,
        seq_len=seq_len,
        documents=documents,
        val=val,
        store=store,
        plan=plan,
        corpus_dir=corpus_dir(cache, manifest["corpus_sha256"]),
    )
