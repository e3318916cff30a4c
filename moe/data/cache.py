"""The on-disk cache: where each prepared artefact lives, and safe concurrent writes.

Layout under the cache root (`DataConfig.cache_dir`):

    corpora/<corpus sha256>/                        documents.jsonl, corpus.json (per-domain manifest)
    tokenizers/bpe-<vocab>-<key>/                   tokenizer.json (key: corpus, train split, vocab)
    tokens/<corpus sha[:24]>-<tokenizer sha[:24]>/  tokens.npy, offsets.npy
    requests/hf-<key>.json                          hf request -> corpus sha (skips re-streaming)
    locks/                                          one lock file per entry being built

Entries are built under a temporary name and renamed into place, and builders of one entry take
its lock, so ranks of a distributed job can share a cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def corpus_dir(cache: Path, corpus_sha: str) -> Path:
    return cache / "corpora" / corpus_sha


def tokens_dir(cache: Path, corpus_sha: str, tokenizer_sha: str) -> Path:
    return cache / "tokens" / f"{corpus_sha[:24]}-{tokenizer_sha[:24]}"


def tokenizer_dir(cache: Path, vocab_size: int, key: str) -> Path:
    return cache / "tokenizers" / f"bpe-{vocab_size}-{key}"


def request_file(cache: Path, key: str) -> Path:
    return cache / "requests" / f"hf-{key}.json"


@contextmanager
def locked(cache: Path, key: str) -> Iterator[None]:
    """Serialize building the cache entry `key` across processes (ranks of a job share the cache)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: atomic renames alone keep the cache consistent
        yield
        return
    path = cache / "locks" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class atomic_dir:
    """Context manager: build a directory under a temporary name, rename it into place at exit.

    Ranks of a distributed job may prepare the same data at once; each builds privately and the
    first rename wins, so readers never see a half-written cache entry.
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                os.rename(self.tmp, self.target)
                return
            except OSError:
                if not self.target.exists():
                    raise
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
