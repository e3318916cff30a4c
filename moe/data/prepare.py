"""Preparation: source -> corpus -> document split -> tokenizer -> token arrays -> PreparedData.

Every step is cached on disk (layout in `moe.data.cache`) and keyed by what determines it: the
corpus by the hash of its text, the BPE tokenizer by corpus + train split + vocabulary size, the
token arrays by corpus + tokenizer. A rerun with the same config and seed only re-reads the source
(for hf not even that) and loads the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from moe.data.cache import atomic_dir, corpus_dir, locked, request_file, tokenizer_dir, tokens_dir, write_json
from moe.data.config import DataConfig, as_data_config, resolve_cache_dir
from moe.data.corpus import TextCorpus, TokenCorpus, scrap_chars
from moe.data.errors import DataError, UpsamplingWarning, ValidationDocumentsWarning
from moe.data.prepared import FORMAT_VERSION, DocumentInfo, PreparedData
from moe.data.sources import load_corpus
from moe.data.split import mixture_weights, split_documents
from moe.data.stream import TokenStore, TrainPlan, stream_fingerprint, val_windows
from moe.data.tokenizer import BPETokenizer, IdTokenizer, PretrainedTokenizer, Tokenizer


def prepare_data(cfg: DataConfig | Any, *, seed: int, cache_dir: str | Path | None = None) -> PreparedData:
    """Build (or load from the cache) the data of `cfg` for run seed `seed`.

    `cfg` may be a `DataConfig` or the OmegaConf node Hydra passes. `seed` decides the
    train/validation split and the stream order; `cache_dir` overrides `cfg.cache_dir`.
    """
    cfg = as_data_config(cfg)
    try:
        seed = operator.index(seed)  # ints and numpy integers; not floats
    except TypeError:
        seed = -1
    if seed < 0:
        raise DataError(f"seed={seed!r} must be a non-negative integer")
    cache = resolve_cache_dir(cache_dir if cache_dir is not None else cfg.cache_dir)
    corpus, directory = _corpus(cfg, cache)
    domains = corpus.domains
    is_val, val_order = split_documents(corpus.doc_domain, domains, seed=seed, val_fraction=cfg.val_fraction)
    train_docs = np.flatnonzero(~is_val)

    if isinstance(corpus, TokenCorpus):
        tokenizer: Tokenizer = IdTokenizer(cfg.synthetic.vocab_size)
        store = _token_store(cache, corpus, tokenizer, lambda: corpus.doc_tokens)
    else:
        tokenizer = _tokenizer(cfg, corpus, train_docs, cache)
        store = _token_store(cache, corpus, tokenizer, lambda: _encode(tokenizer, corpus))

    weights = mixture_weights(cfg.mixture, domains)
    # Python floats: their repr (hashed here) does not change with the numpy version.
    fingerprint = stream_fingerprint(
        FORMAT_VERSION, corpus.sha256, tokenizer.sha256, seed, cfg.seq_len, tuple(round(float(w), 12) for w in weights)
    )
    plan = TrainPlan(store, train_docs, weights, seq_len=cfg.seq_len, seed=seed, fingerprint=fingerprint)
    val = {}
    for d, name in enumerate(domains):
        val[name] = val_windows(
            store,
            val_order[d],
            seq_len=cfg.seq_len,
            max_tokens=cfg.val_tokens_per_domain,
            min_docs=cfg.min_val_docs_per_domain,
        )
        if val[name][0].shape[0] == 0:
            raise DataError(
                f"domain {name!r} has {int(store.doc_lengths[val_order[d]].sum())} validation tokens, fewer "
                f"than seq_len+1={cfg.seq_len + 1}; raise data.val_fraction or lower data.seq_len"
            )
    warnings_ = check_val_documents(cfg, corpus, val, val_order) + check_upsampling(cfg, domains, plan)
    sources = corpus.sources if isinstance(corpus, TokenCorpus) else [d.source for d in corpus.documents]
    documents = [
        DocumentInfo(i, domains[corpus.doc_domain[i]], sources[i], "val" if is_val[i] else "train")
        for i in range(len(sources))
    ]
    manifest = _manifest(cfg, seed, cache, corpus, directory, tokenizer, store, train_docs, val, weights, fingerprint)
    manifest["warnings"] = warnings_
    texts = None if isinstance(corpus, TokenCorpus) else [d.text for d in corpus.documents]
    return PreparedData(
        domains=domains,
        tokenizer=tokenizer,
        manifest=manifest,
        seq_len=cfg.seq_len,
        documents=documents,
        val=val,
        store=store,
        plan=plan,
        texts=texts,
        corpus_dir=directory,
    )


def check_val_documents(
    cfg: DataConfig,
    corpus: TextCorpus | TokenCorpus,
    val: dict[str, tuple[np.ndarray, np.ndarray]],
    val_order: list[np.ndarray],
) -> list[str]:
    """Refuse a domain with fewer than 2 documents in its validation set; warn (and return the
    messages, for the manifest) for each domain with fewer than `cfg.min_val_docs_per_domain`."""
    messages = []
    for d, name in enumerate(corpus.domains):
        used = int(np.unique(val[name][1]).size)
        if used >= cfg.min_val_docs_per_domain:
            continue
        held = int(val_order[d].size)
        n_docs = int(np.sum(corpus.doc_domain == d))
        what = (
            f"domain {name!r} has {used} document(s) in its validation set ({held} of its {n_docs} documents held out)"
        )
        fixes = _val_fixes(cfg, corpus, d, used, held, n_docs)
        if used < 2:
            raise DataError(f"{what}; document resampling needs at least 2: {fixes}")
        message = (
            f"{what}, fewer than data.min_val_docs_per_domain={cfg.min_val_docs_per_domain}: document-level "
            f"statistics (permutation nulls, bootstrap intervals) will be weak. To get more: {fixes}"
        )
        warnings.warn(message, ValidationDocumentsWarning, stacklevel=3)
        messages.append(message)
    return messages


def check_upsampling(cfg: DataConfig, domains: list[str], plan: TrainPlan) -> list[str]:
    """Warn (and return the messages, for the manifest) for each domain whose train text the mixture
    repeats more than `cfg.max_upsample` times per pass over the corpus."""
    messages = []
    for name, factor, tokens, weight in zip(domains, plan.upsampling(), plan.train_tokens_by_domain(), plan.weights):
        if factor <= cfg.max_upsample:
            continue
        message = (
            f"domain {name!r} has {tokens} train tokens; its mixture weight {weight:.3g} repeats them "
            f"{factor:.3g}x per pass over the corpus, more than data.max_upsample={cfg.max_upsample:g}: the "
            "model will see the same documents over and over and memorize them. Add text to this domain, "
            "lower its weight (data.mixture), or drop it; raise data.max_upsample to accept it."
        )
        warnings.warn(message, UpsamplingWarning, stacklevel=3)
        messages.append(message)
    return messages


def _val_fixes(cfg: DataConfig, corpus: TextCorpus | TokenCorpus, d: int, used: int, held: int, n_docs: int) -> str:
    """The settings that would give domain `d` more validation documents, as one sentence."""
    want = cfg.min_val_docs_per_domain
    fixes = []
    if held > used:
        fixes.append(
            f"raise data.val_tokens_per_domain (now {cfg.val_tokens_per_domain}: {held} documents are "
            f"held out but only {used} fit)"
        )
    if held < want:
        docs_needed = math.ceil(want / cfg.val_fraction)
        if cfg.source == "synthetic":
            fixes.append(
                f"raise data.synthetic.tokens_per_domain (now {cfg.synthetic.tokens_per_domain}) or lower "
                f"data.synthetic.doc_len (now {cfg.synthetic.doc_len})"
            )
        elif isinstance(corpus, TextCorpus):  # the text sources (a token corpus has no text to measure)
            chars = sum(len(doc.text) for doc, k in zip(corpus.documents, corpus.doc_domain) if k == d)
            cap = cfg.max_chars_per_domain
            capped = cap is not None and chars > cap - scrap_chars(cap)
            if capped:
                suggest = math.ceil(docs_needed * chars / n_docs / 100_000) * 100_000
                fixes.append(
                    f"raise data.max_chars_per_domain (now {cfg.max_chars_per_domain}; about {suggest} "
                    f"takes the {docs_needed} documents that hold out {want} at val_fraction "
                    f"{cfg.val_fraction})"
                )
            if cfg.source == "builtin" and capped:
                fixes.append(
                    f"lower data.builtin.max_chars_per_doc (now {cfg.builtin.max_chars_per_doc})"
                    + (" or data.builtin.math_problems_per_doc" if corpus.domains[d] == "math" else "")
                )
            elif cfg.source == "builtin" and corpus.domains[d] == "legal":
                fixes.append(
                    f"the legal domain already holds every distinct licence text installed here ({n_docs}); "
                    f"installing more packages (e.g. the dev extras) adds licences"
                )
            elif cfg.source == "builtin":
                fixes.append(f"this domain already holds all its text on this machine ({n_docs} documents)")
            elif cfg.source == "local" and not capped:
                fixes.append(
                    f"add documents of this domain under data.local.path={cfg.local.path} (about "
                    f"{docs_needed} are needed)"
                )
            elif cfg.source == "hf" and not capped:
                fixes.append(
                    "raise data.hf.max_docs_per_domain or data.hf.max_records if set, or add records of this domain"
                )
        fixes.append(f"raise data.val_fraction (now {cfg.val_fraction}: {held} of {n_docs} documents held out)")
    return "; ".join(fixes) + "."


def _corpus(cfg: DataConfig, cache: Path) -> tuple[TextCorpus | TokenCorpus, Path | None]:
    """Load the source (or, for hf, its cached copy) and cache the text by its hash."""
    request = None
    if cfg.source == "hf":
        from moe.data.sources.hf import request_key

        request = request_file(cache, request_key(cfg))
        if request.exists():
            directory = corpus_dir(cache, json.loads(request.read_text())["corpus_sha256"])
            if (directory / "corpus.json").exists():
                return TextCorpus.load(directory), directory
    corpus = load_corpus(cfg)
    if isinstance(corpus, TokenCorpus):
        return corpus, None
    directory = corpus_dir(cache, corpus.sha256)
    corpus.save(directory)
    if request is not None:
        write_json(request, {"corpus_sha256": corpus.sha256})
    return corpus, directory


def _tokenizer(cfg: DataConfig, corpus: TextCorpus, train_docs: np.ndarray, cache: Path) -> Tokenizer:
    if cfg.tokenizer.startswith("hf:"):
        return PretrainedTokenizer(cfg.tokenizer[3:])
    import tokenizers

    key = hashlib.sha256(
        json.dumps(
            [
                corpus.sha256,
                cfg.vocab_size,
                hashlib.sha256(train_docs.astype("<i8").tobytes()).hexdigest(),
                tokenizers.__version__,
            ]
        ).encode()
    ).hexdigest()[:32]
    directory = tokenizer_dir(cache, cfg.vocab_size, key)
    with locked(cache, directory.name):
        if not (directory / "tokenizer.json").exists():
            tok = BPETokenizer.train([corpus.documents[i].text for i in train_docs], cfg.vocab_size)
            with atomic_dir(directory) as tmp:
                tok.save(tmp)
        return BPETokenizer.load(directory)


def _encode(tokenizer: Tokenizer, corpus: TextCorpus, chunk: int = 512) -> list[np.ndarray]:
    """Token ids per document (chunks bound the memory of the intermediate Python lists)."""
    out: list[np.ndarray] = []
    texts = [d.text for d in corpus.documents]
    for i in range(0, len(texts), chunk):
        out.extend(np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts[i : i + chunk]))
    return out


def _token_store(
    cache: Path, corpus: TextCorpus | TokenCorpus, tokenizer: Tokenizer, encode: Callable[[], Sequence[np.ndarray]]
) -> TokenStore:
    """The document-major token array of `corpus` under `tokenizer`, from the cache or built."""
    directory = tokens_dir(cache, corpus.sha256, tokenizer.sha256)
    with locked(cache, directory.name):
        if not (directory / "offsets.npy").exists():
            docs = encode()
            dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
            eos = np.array([tokenizer.eos_id], dtype=np.int64)
            tokens = np.concatenate([np.concatenate([d, eos]) for d in docs]).astype(dtype)
            offsets = np.concatenate([[0], np.cumsum([d.size + 1 for d in docs])]).astype(np.int64)
            with atomic_dir(directory) as tmp:
                np.save(tmp / "tokens.npy", tokens)
                np.save(tmp / "offsets.npy", offsets)
        return TokenStore.load(directory, corpus.doc_domain)


def _manifest(
    cfg: DataConfig,
    seed: int,
    cache: Path,
    corpus: TextCorpus | TokenCorpus,
    directory: Path | None,
    tokenizer: Tokenizer,
    store: TokenStore,
    train_docs: np.ndarray,
    val: dict[str, tuple[np.ndarray, np.ndarray]],
    weights: np.ndarray,
    fingerprint: str,
) -> dict:
    import tokenizers

    lengths = store.doc_lengths
    split = {}
    for d, name in enumerate(corpus.domains):
        tr = train_docs[corpus.doc_domain[train_docs] == d]
        va = np.flatnonzero(corpus.doc_domain == d)
        va = va[~np.isin(va, tr)]
        # val_documents / val_tokens: every held-out document (tokens with EOS); *_used: what the
        # validation set holds (documents with a token in it, input positions), the numbers a
        # document-level statistic on the validation batches rests on.
        split[name] = {
            "train_documents": int(tr.size),
            "val_documents": int(va.size),
            "train_tokens": int(lengths[tr].sum()),
            "val_tokens": int(lengths[va].sum()),
            "val_documents_used": int(np.unique(val[name][1]).size),
            "val_tokens_used": int(val[name][1].size),
        }
    return {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "corpus_sha256": corpus.sha256,
        "seed": seed,
        "domains": corpus.domain_manifest(),
        "split": split,
        "mixture": {name: float(w) for name, w in zip(corpus.domains, weights)},
        "tokenizer": {
            **tokenizer.describe(),
            "requested_vocab_size": cfg.vocab_size,
            "trained_on": "train split" if isinstance(tokenizer, BPETokenizer) else None,
        },
        "total_tokens": int(store.tokens.size),
        "stream_fingerprint": fingerprint,
        "config": asdict(cfg),
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "numpy": np.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "cache": {"root": str(cache), "corpus": str(directory) if directory else None},
    }
