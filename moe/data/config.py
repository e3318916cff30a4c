"""Configuration schema of the data pipeline (the ``data`` group of the Hydra config).

The defaults below are the only copy of the default values: ``conf/data/<source>.yaml`` sets the
source and the few knobs that differ for it, and documents every knob in its header. Plain data only
(str/int/float/bool/list/dict/Optional and nested dataclasses) so the schema round-trips through
YAML and builds on any machine.

Two seeds are kept apart on purpose: ``corpus_seed`` (here) decides *what the corpus is* (which files,
which generated problems, which synthetic process), the run seed (passed by the caller) decides the
train/validation split and the order of the stream. Runs with different seeds therefore train on
the same corpus, and a corpus hash identifies the text whatever the run seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe.data.errors import DataError
from moe.validation import check_choice

NON_UTF8_POLICIES = ("replace", "skip")
LOCAL_FORMATS = ("auto", "dir", "jsonl", "parquet")
BUILTIN_DOMAINS = ("c", "code", "legal", "math", "prose")


def __getattr__(name: str) -> Any:
    # SOURCES, the names `data.source` may take, comes from the registry in moe.data.sources (which
    # imports this module, hence looked up on use), so that it lists sources registered at run time.
    if name == "SOURCES":
        from moe.data.sources import source_names

        return source_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class BuiltinSourceConfig:
    """The offline corpus assembled from what every Python installation carries."""

    # Domains to assemble. Available: code (stdlib Python source), prose (the Python docs shipped
    # as pydoc topics), legal (licence texts of Python and installed packages), math (generated
    # DeepMind-Mathematics-style questions and answers), c (CPython C headers; needs the include
    # directory, which some distributions ship only in a -dev package, hence not a default).
    domains: list[str] = field(default_factory=lambda: ["code", "legal", "math", "prose"])
    # A file longer than this is truncated at a line boundary, so one large file (the stdlib has
    # 200 KB modules) cannot fill a whole domain, and every domain has enough documents for
    # document-level statistics (see min_val_docs_per_domain): at 3 KB the default domain cap holds
    # ~300 code files (the median stdlib module is ~8 KB), and 30 of them (<= ~1,000 tokens each)
    # fit whole into val_tokens_per_domain.
    max_chars_per_doc: int = 3072
    # Question/answer pairs per generated math document (a "problem set").
    math_problems_per_doc: int = 40


@dataclass
class SyntheticSourceConfig:
    """Domains that are Markov chains with a known ground truth (for tests and planted experiments)."""

    num_domains: int = 4
    # Size of the chain's state space; the tokenizer adds one EOS id on top (vocab = this + 1).
    vocab_size: int = 256
    # 0: every domain lives on its own block of the vocabulary with its own transitions (disjoint);
    # 1: all domains are the same process. In between, each step follows the shared chain with
    # probability `overlap` and the domain's private chain otherwise.
    overlap: float = 0.0
    tokens_per_domain: int = 100_000
    # Mean document length in tokens; lengths are uniform in [doc_len/2, 3*doc_len/2].
    doc_len: int = 256
    # Successors per state. Few successors make the chain predictable, so a model that tells the
    # domains apart gains a measurable loss advantage.
    branching: int = 8


@dataclass
class LocalSourceConfig:
    """Text on local disk: one sub-directory per domain, or JSONL / Parquet records."""

    # A directory or a single .jsonl/.parquet file. Required for source=local.
    path: str | None = None
    # auto: a file by its extension; a directory holding .jsonl/.parquet files at its top level is
    # read as records, any other directory as one sub-directory per domain.
    format: str = "auto"
    # Record fields (dotted paths such as "meta.domain" reach into nested objects).
    text_field: str = "text"
    domain_field: str = "domain"
    # Files read in the directory form; others are ignored (and listed in the manifest).
    extensions: list[str] = field(
        default_factory=lambda: [".txt", ".md", ".rst", ".tex", ".py", ".c", ".h", ".cpp", ".js", ".java"]
    )


@dataclass
class HFDomainSpec:
    """One domain taken from its own Hugging Face dataset (the `hf.domains` mapping)."""

    path: str | None = None  # dataset name on the Hub, or a builder such as "json"
    name: str | None = None  # dataset configuration
    split: str = "train"
    data_files: list[str] | None = None
    revision: str | None = None
    text_field: str | None = None  # None: use hf.text_field


@dataclass
class HFSourceConfig:
    """Hugging Face `datasets`: one dataset with a domain field, or one dataset per domain."""

    path: str | None = None
    name: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    # Pin a dataset revision so a cached corpus cannot silently differ from the remote one.
    revision: str | None = None
    text_field: str = "text"
    # Dotted path of the domain label in each record, e.g. "meta.pile_set_name" for the Pile.
    domain_field: str | None = None
    # With domain_field: keep only these domains (None keeps every label seen).
    include_domains: list[str] | None = None
    # Alternative to domain_field: domain name -> dataset spec (empty: not used). A dict by default
    # for the same reason as DataConfig.mixture.
    domains: dict[str, HFDomainSpec] | None = field(default_factory=dict)
    streaming: bool = True
    # Where `datasets` keeps downloads and Arrow files (None: its default, $HF_DATASETS_CACHE).
    cache_dir: str | None = None
    max_docs_per_domain: int | None = None
    # With domain_field: stop reading after this many records (None: until every kept domain is
    # full, or the dataset ends).
    max_records: int | None = None
    # Records are drawn in a random order seeded by corpus_seed, so a capped domain is a random
    # sample, not the dataset's first records: a downloaded dataset is permuted exactly, a streamed
    # one is shuffled by shard order and through a buffer of this many records (read ahead).
    # null or 0: the dataset's own order.
    shuffle_buffer: int | None = 10_000


@dataclass
class DataConfig:
    """Schema of the `data` config group. See conf/data/*.yaml for the presets."""

    source: str = "builtin"  # builtin | synthetic | local | hf
    # Tokens per training sequence (S in [B, S]).
    seq_len: int = 256
    # BPE vocabulary size including the EOS token; a few thousand suits CPU-sized models. The
    # synthetic source ignores it (its vocabulary is synthetic.vocab_size + 1).
    vocab_size: int = 4096
    # "bpe": byte-level BPE trained on the train split; "hf:<name>": a pretrained tokenizer
    # (needs `transformers` and network access). The synthetic source ignores it (ids are tokens).
    tokenizer: str = "bpe"
    # Fraction of each domain's documents held out for validation (split by document). 0.2 rather
    # than 0.1: the builtin legal domain has only ~170 distinct licences on a machine with the dev
    # extras installed, and min_val_docs_per_domain of them must be held out.
    val_fraction: float = 0.2
    # Validation tokens kept per domain (input positions); caps the cost of an evaluation. The
    # budget is spread over documents so that min_val_docs_per_domain of them fit (see val_windows).
    val_tokens_per_domain: int = 32768
    # Validation documents each domain should have in its validation set: document-level statistics
    # (permutation nulls and bootstrap intervals over documents) are weak with fewer. Fewer than
    # this: a warning naming the settings to change (also listed in the manifest under "warnings");
    # fewer than 2: refused, since resampling documents needs at least two. When the first this-many
    # held-out documents overflow val_tokens_per_domain, each of them contributes only its first
    # tokens (one cap for all, the smallest that fills the budget), so long documents cannot crowd
    # the others out.
    min_val_docs_per_domain: int = 30
    # Domain -> weight of that domain in the train token stream. Empty (or null): every domain
    # contributes equally whatever its size. Unlisted domains get weight 0 (still validated on).
    # An empty dict rather than None by default: Hydra cannot override a None-valued dict from the
    # command line at all, while an empty one takes `++data.mixture={code: 3, math: 1}`.
    mixture: dict[str, float] | None = field(default_factory=dict)
    # Warn (and note in the manifest) when the mixture repeats a domain's train text more than this
    # many times per pass over the corpus: a tiny domain given an equal share is seen hundreds of
    # times, and the model memorizes it rather than learning it. A warning only; it does not change
    # the stream.
    max_upsample: float = 10.0
    # Characters of text kept per domain (None: no cap). 800 KB per domain keeps the builtin
    # corpus (~2.2 MB: prose and legal hold less, all there is) quick to prepare on a laptop CPU
    # (~4 s, then cached) with >= 150 documents per domain. conf/data/local.yaml and hf.yaml set
    # larger caps: their documents are longer.
    max_chars_per_domain: int | None = 800_000
    # Bytes that are not UTF-8 inside otherwise good text: "replace" with U+FFFD or "skip" (drop)
    # them. Either way they are counted in the manifest. Files that are not text at all fail.
    non_utf8: str = "replace"
    # Decides which documents a capped domain keeps, the generated math, the synthetic process.
    corpus_seed: int = 0
    # Where prepared corpora, tokenizers and token arrays are cached. None: $MOE_CACHE_DIR, else
    # ~/.cache/moe-specialization.
    cache_dir: str | None = None
    builtin: BuiltinSourceConfig = field(default_factory=BuiltinSourceConfig)
    synthetic: SyntheticSourceConfig = field(default_factory=SyntheticSourceConfig)
    local: LocalSourceConfig = field(default_factory=LocalSourceConfig)
    hf: HFSourceConfig = field(default_factory=HFSourceConfig)


def as_data_config(cfg: Any) -> DataConfig:
    """Return `cfg` as a validated `DataConfig`.

    Accepts a `DataConfig`, an OmegaConf node (as Hydra passes `cfg.data`) or a plain dict; the
    latter two are merged onto the schema, so a misspelt key fails here with OmegaConf's message.
    """
    if not isinstance(cfg, DataConfig):
        from omegaconf import OmegaConf

        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
        cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def validate(cfg: DataConfig) -> None:
    """Check ranges and choices early, naming the field and the allowed values. The checks of the
    selected source's own section (`data.<source>.*`) are the source's (`moe.data.sources`)."""
    from moe.data.sources import get_source  # here: the sources import this module

    source = get_source(cfg.source)  # DataError naming the known sources
    if cfg.seq_len < 1:
        raise DataError(f"data.seq_len={cfg.seq_len} must be a positive number of tokens")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must lie strictly between 0 and 1")
    if cfg.val_tokens_per_domain < cfg.seq_len:
        raise DataError(
            f"data.val_tokens_per_domain={cfg.val_tokens_per_domain} is below data.seq_len="
            f"{cfg.seq_len}; raise it so each domain has at least one validation sequence"
        )
    check_choice("data.non_utf8", cfg.non_utf8, NON_UTF8_POLICIES, error=DataError)
    if cfg.max_chars_per_domain is not None and cfg.max_chars_per_domain < 1:
        raise DataError("data.max_chars_per_domain must be positive, or null for no cap")
    if cfg.min_val_docs_per_domain < 2:
        raise DataError(
            f"data.min_val_docs_per_domain={cfg.min_val_docs_per_domain} must be at least 2 (resampling "
            f"documents needs two)"
        )
    if cfg.tokenizer != "bpe" and not cfg.tokenizer.startswith("hf:"):
        raise DataError(f"data.tokenizer={cfg.tokenizer!r} is unknown; use 'bpe' or 'hf:<name>'")
    if cfg.tokenizer == "bpe" and source.text and cfg.vocab_size < 257:
        # Byte-level BPE starts from 256 byte tokens plus EOS.
        raise DataError(f"data.vocab_size={cfg.vocab_size} is below 257 (256 bytes + EOS); raise it")
    for name, value, ok, want in (
        ("vocab_size", cfg.vocab_size, cfg.vocab_size >= 1, ">= 1"),
        ("corpus_seed", cfg.corpus_seed, cfg.corpus_seed >= 0, "an integer >= 0"),
        ("max_upsample", cfg.max_upsample, cfg.max_upsample >= 1, "a number >= 1 (inf: never warn)"),
    ):
        if not ok:  # also catches nan: every comparison with it is False
            raise DataError(f"data.{name}={value} is out of range: it must be {want}")
    if cfg.mixture:
        for name, w in cfg.mixture.items():
            if not (0.0 <= w < float("inf")):  # also rejects NaN
                raise DataError(f"data.mixture[{name!r}]={w} must be a finite, non-negative weight")
        if sum(cfg.mixture.values()) <= 0:
            raise DataError("data.mixture gives every domain weight 0; give at least one a positive weight")
    if source.validate is not None:
        source.validate(cfg)


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The cache root: the argument, else $MOE_CACHE_DIR, else ~/.cache/moe-specialization."""
    if cache_dir is None or str(cache_dir) == "":
        cache_dir = os.environ.get("MOE_CACHE_DIR") or "~/.cache/moe-specialization"
    return Path(os.path.expandvars(str(cache_dir))).expanduser()
