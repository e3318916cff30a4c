"""Tokenizers with one interface: encode / encode_batch / decode / vocab_size / eos_id / save.

- `BPETokenizer`: byte-level BPE trained with the `tokenizers` library on the train split. Byte
  level means every string round-trips exactly (no unknown token), whatever the domain.
- `IdTokenizer`: the synthetic source's ids, printed as "<t17>".
- `PretrainedTokenizer`: a Hugging Face tokenizer by name (`tokenizer: hf:<name>`).

`load_tokenizer(dir)` reads back whatever `save(dir)` wrote.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

from moe.data.errors import DataError

EOS = "<|endoftext|>"
_META = "tokenizer_meta.json"


def _write_meta(directory: Path, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _META).write_text(json.dumps(meta, indent=1) + "\n")


class BPETokenizer:
    """Byte-level BPE; the EOS token is id 0 (the first special token)."""

    kind = "bpe"

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        self._tok = tok
        eos = tok.token_to_id(EOS)
        if eos is None:
            raise DataError(f"tokenizer has no {EOS!r} token; it was not trained by this package")
        self.eos_id: int = eos
        self.vocab_size: int = tok.get_vocab_size()
        self.sha256: str = hashlib.sha256(tok.to_str().encode()).hexdigest()

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> BPETokenizer:
        """Train on `texts` (the train split). The vocabulary may come out smaller than
        `vocab_size` when the text has fewer mergeable pairs; `vocab_size` tells the truth."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            # All 256 bytes from the start, so text unseen in training (another domain, the
            # validation split) always encodes.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads)."""
        fast = getattr(self._tok, "encode_batch_fast", None)  # skips offsets; tokenizers >= 0.20
        encodings = (fast or self._tok.encode_batch)(list(texts))
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        _write_meta(directory, self.describe())

    @classmethod
    def load(cls, directory: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(directory) / "tokenizer.json")))

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "sha256": self.sha256}


class IdTokenizer:
    """Token ids that are already ids (synthetic source): ids 0..V-1 print as "<tN>", EOS = V."""

    kind = "ids"
    _PIECE = re.compile(r"<t(\d+)>|<eos>")

    def __init__(self, process_vocab_size: int) -> None:
        self.vocab_size: int = process_vocab_size + 1
        self.eos_id: int = process_vocab_size
        self.sha256: str = hashlib.sha256(f"ids:{self.vocab_size}".encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        ids, pos = [], 0
        for m in self._PIECE.finditer(text):
            if m.start() != pos:
                break
            ids.append(self.eos_id if m.group(1) is None else int(m.group(1)))
            pos = m.end()
        if pos != len(text) or any(i > self.eos_id for i in ids):
            raise DataError(f"{text[pos : pos + 20]!r} is not synthetic tokens; write ids as <t17> and EOS as <eos>")
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join("<eos>" if int(i) == self.eos_id else f"<t{int(i)}>" for i in ids)

    def save(self, directory: str | Path) -> None:
        _write_meta(Path(directory), self.describe())

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "sha256": self.sha256}


class PretrainedTokenizer:
    """A Hugging Face tokenizer (`transformers.AutoTokenizer`), e.g. `hf:gpt2`."""

    kind = "hf"

    def __init__(self, name: str, directory: str | Path | None = None) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise DataError(
                f"data.tokenizer=hf:{name} needs `transformers`: pip install 'moe-specialization[hf]', "
                f"or use data.tokenizer=bpe"
            ) from e
        self.name = name
        self._tok = AutoTokenizer.from_pretrained(str(directory) if directory else name)
        if self._tok.eos_token_id is None:
            raise DataError(f"pretrained tokenizer {name!r} has no EOS token; choose another or use bpe")
        self.eos_id: int = int(self._tok.eos_token_id)
        self.vocab_size: int = len(self._tok)
        vocab = json.dumps(sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1]))
        self.sha256: str = hashlib.sha256(f"hf:{name}:{vocab}".encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Iterable[int]) -> str:
        # transformers types decode() as str | list[str] (for batched input); flat ids give one str.
        return cast(str, self._tok.decode([int(i) for i in ids]))

    def save(self, directory: str | Path) -> None:
        self._tok.save_pretrained(str(directory))
        _write_meta(Path(directory), {**self.describe(), "name": self.name})

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "sha256": self.sha256,
        }


Tokenizer = BPETokenizer | IdTokenizer | PretrainedTokenizer


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Reload a tokenizer saved with `.save(directory)`."""
    directory = Path(directory)
    meta_path = directory / _META
    if not meta_path.exists():
        raise DataError(f"{directory} holds no saved tokenizer ({_META} missing); pass a run's data directory")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == "bpe":
        return BPETokenizer.load(directory)
    if meta["kind"] == "ids":
        return IdTokenizer(meta["vocab_size"] - 1)
    if meta["kind"] == "hf":
        return PretrainedTokenizer(meta["name"], directory)
    raise DataError(f"{meta_path} names an unknown tokenizer kind {meta['kind']!r}")
