"""The corpus: documents with domain labels, their hash, and the manifest facts per domain.

A source returns one `DomainText` per domain; `TextCorpus` orders them (domains sorted by name,
documents in the order the source chose) and that order defines the corpus-wide document ids.
Hashes cover the text and the document boundaries only (not file paths), so the same corpus
hashes the same on machines that install Python in different places.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe.data.cache import atomic_dir, write_json
from moe.data.errors import DataError
from moe.data.text import truncate_at_line

CORPUS_FORMAT = 1


@dataclass(frozen=True)
class Document:
    """One document: `source` is a portable id ("stdlib/json/decoder.py", "math/numbers__gcd/00011")."""

    source: str
    text: str


@dataclass
class DomainText:
    """The documents of one domain plus what the manifest records about how they were read."""

    name: str
    documents: list[Document] = field(default_factory=list)
    origin: str = ""  # where the text came from on this machine (directory, dataset)
    undecodable_bytes: int = 0
    truncated_documents: int = 0
    skipped: list[str] = field(default_factory=list)  # "<source>: <reason>"


class DomainBudget:
    """Collects documents of one domain up to a character cap and a document cap.

    Documents are offered in the order the source decided (seeded, so deterministic); a document
    that would overflow the cap is truncated at a line to fill it exactly, then the domain is full.
    """

    def __init__(
        self,
        domain: DomainText,
        *,
        max_chars: int | None,
        max_docs: int | None = None,
        max_chars_per_doc: int | None = None,
        dedupe: bool = False,
    ) -> None:
        self.domain = domain
        self.max_chars = max_chars
        self.max_docs = max_docs
        self.max_chars_per_doc = max_chars_per_doc
        # dedupe: skip a document whose kept text (after truncation, whitespace-normalized) equals
        # one already kept; two licences that share their first pages are one document once cut.
        self._seen: set[str] | None = set() if dedupe else None
        self.chars = 0

    @property
    def full(self) -> bool:
        return (self.max_chars is not None and self.chars >= self.max_chars) or (
            self.max_docs is not None and len(self.domain.documents) >= self.max_docs
        )

    def add(self, source: str, text: str, undecodable_bytes: int = 0) -> bool:
        """Offer a document; return False once the domain is full. Empty texts are skipped."""
        if self.full:
            return False
        if not text.strip():
            self.domain.skipped.append(f"{source}: empty")
            return True
        limit = self.max_chars_per_doc
        if self.max_chars is not None:
            left = self.max_chars - self.chars
            if len(text) > left and left < scrap_chars(self.max_chars):
                # A scrap of a few characters is not a document worth having: the domain is full.
                self.chars = self.max_chars
                return False
            limit = left if limit is None else min(limit, left)
        truncated = False
        if limit is not None and len(text) > limit:
            text, truncated = truncate_at_line(text, limit), True
        if self._seen is not None:
            key = normalized_hash(text)
            if key in self._seen:
                self.domain.skipped.append(f"{source}: duplicate text")
                return True
            self._seen.add(key)
        self.domain.truncated_documents += int(truncated)
        self.domain.documents.append(Document(source, text))
        self.domain.undecodable_bytes += undecodable_bytes
        self.chars += len(text)
        return not self.full


def scrap_chars(max_chars: int) -> int:
    """Room left under a domain cap below which the domain counts as full: a document would be cut
    to a scrap of this few characters. So a domain of `chars` reached its cap iff
    chars > max_chars - scrap_chars(max_chars)."""
    return min(512, max_chars // 8)


def normalized_hash(text: str) -> str:
    """Hash of `text` with whitespace runs collapsed (reflowed copies of a text hash alike)."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def seeded_order(items: Sequence, seed: int, salt: str) -> list:
    """`items` in an order fixed by (seed, salt): the way capped domains pick their documents.

    `items` should already be sorted (sorted paths) so the order does not depend on how a
    directory happened to list them.
    """
    rng = np.random.default_rng([seed, name_salt(salt)])
    return [items[i] for i in rng.permutation(len(items))]


def name_salt(name: str) -> int:
    """A stable 32-bit integer from a name, to give each domain its own RNG stream."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _doc_hash_update(h: hashlib._Hash, payload: bytes) -> None:
    # Length-prefixed so that moving a boundary between two documents changes the hash.
    h.update(len(payload).to_bytes(8, "little"))
    h.update(payload)


class TextCorpus:
    """Documents of text with their domain; domains sorted by name, ids = position in this order."""

    def __init__(self, domains: Iterable[DomainText], *, source: str) -> None:
        self.source = source
        self.domain_texts = sorted(domains, key=lambda d: d.name)
        names = [d.name for d in self.domain_texts]
        if not names:
            raise DataError(f"the {source} source produced no domains; check its path / dataset and fields")
        if len(set(names)) != len(names):
            raise DataError(f"duplicate domain names {names}; domain names must be unique")
        for d in self.domain_texts:
            if not d.documents:
                raise DataError(
                    f"domain {d.name!r} ({d.origin or source}) has no documents; add text to it, "
                    f"or remove it from the data config"
                    + (f" (skipped: {', '.join(d.skipped[:5])})" if d.skipped else "")
                )
        self.domains: list[str] = names
        self.documents: list[Document] = [doc for d in self.domain_texts for doc in d.documents]
        self.doc_domain = np.concatenate(
            [np.full(len(d.documents), i, dtype=np.int64) for i, d in enumerate(self.domain_texts)]
        )
        self._domain_hash = {d.name: self._hash_texts(doc.text for doc in d.documents) for d in self.domain_texts}
        h = hashlib.sha256(f"text-corpus-v{CORPUS_FORMAT}".encode())
        for name in names:
            _doc_hash_update(h, name.encode())
            h.update(bytes.fromhex(self._domain_hash[name]))
        self.sha256 = h.hexdigest()

    @staticmethod
    def _hash_texts(texts: Iterable[str]) -> str:
        h = hashlib.sha256()
        for t in texts:
            _doc_hash_update(h, t.encode("utf-8"))
        return h.hexdigest()

    def domain_manifest(self) -> dict[str, dict]:
        """Per domain: sources, bytes (UTF-8), characters, documents, sha256, undecodable bytes..."""
        out = {}
        for d in self.domain_texts:
            out[d.name] = {
                "origin": d.origin,
                "documents": len(d.documents),
                "bytes": sum(len(doc.text.encode("utf-8")) for doc in d.documents),
                "chars": sum(len(doc.text) for doc in d.documents),
                "sha256": self._domain_hash[d.name],
                "undecodable_bytes": d.undecodable_bytes,
                "truncated_documents": d.truncated_documents,
                "skipped": list(d.skipped),
                "sources": [doc.source for doc in d.documents],
            }
        return out

    # ---- cache -------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write documents.jsonl + corpus.json into `directory` atomically (if it is not there)."""
        if (directory / "corpus.json").exists():
            return
        with atomic_dir(directory) as tmp:
            with open(tmp / "documents.jsonl", "w", encoding="utf-8") as f:
                for i, doc in enumerate(self.documents):
                    row = {"domain": self.domains[self.doc_domain[i]], "source": doc.source, "text": doc.text}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            write_json(
                tmp / "corpus.json",
                {
                    "format": CORPUS_FORMAT,
                    "source": self.source,
                    "sha256": self.sha256,
                    "domains": self.domain_manifest(),
                },
            )

    @classmethod
    def load(cls, directory: Path) -> TextCorpus:
        """Read a corpus written by `save`, checking its hash."""
        meta = json.loads((directory / "corpus.json").read_text())
        by_name: dict[str, DomainText] = {}
        for name, info in meta["domains"].items():
            by_name[name] = DomainText(
                name,
                origin=info["origin"],
                undecodable_bytes=info["undecodable_bytes"],
                truncated_documents=info["truncated_documents"],
                skipped=list(info["skipped"]),
            )
        with open(directory / "documents.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                by_name[row["domain"]].documents.append(Document(row["source"], row["text"]))
        corpus = cls(by_name.values(), source=meta["source"])
        if corpus.sha256 != meta["sha256"]:
            raise DataError(f"cached corpus {directory} is corrupt (hash mismatch); delete that directory")
        return corpus


class TokenCorpus:
    """Documents that are token ids already (the synthetic source); same interface as TextCorpus."""

    def __init__(
        self, domains: Sequence[str], docs: Sequence[Sequence[np.ndarray]], *, source: str, origin: dict[str, str]
    ) -> None:
        order = sorted(range(len(domains)), key=lambda i: domains[i])
        self.source = source
        self.domains = [domains[i] for i in order]
        self.doc_tokens: list[np.ndarray] = [t for i in order for t in docs[i]]
        self.doc_domain = np.concatenate([np.full(len(docs[i]), k, dtype=np.int64) for k, i in enumerate(order)])
        self.sources = [f"{domains[i]}/{j:05d}" for i in order for j in range(len(docs[i]))]
        self._origin = origin
        h = hashlib.sha256(f"token-corpus-v{CORPUS_FORMAT}".encode())
        self._domain_hash = {}
        for k, i in enumerate(order):
            dh = hashlib.sha256()
            for t in docs[i]:
                _doc_hash_update(dh, np.asarray(t, dtype="<i4").tobytes())
            self._domain_hash[self.domains[k]] = dh.hexdigest()
            _doc_hash_update(h, self.domains[k].encode())
            h.update(dh.digest())
        self.sha256 = h.hexdigest()

    def domain_manifest(self) -> dict[str, dict]:
        out = {}
        for k, name in enumerate(self.domains):
            idx = np.flatnonzero(self.doc_domain == k)
            out[name] = {
                "origin": self._origin.get(name, ""),
                "documents": int(idx.size),
                "tokens": int(sum(self.doc_tokens[i].size for i in idx)),
                "bytes": 0,  # no text: the documents are token ids
                "sha256": self._domain_hash[name],
                "undecodable_bytes": 0,
                "truncated_documents": 0,
                "skipped": [],
                "sources": [self.sources[i] for i in idx],
            }
        return out
