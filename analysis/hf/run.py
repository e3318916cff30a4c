"""`moe-analyze model=hf:<name>`: the specialization report of a pretrained HF MoE model on any
of the package's domain-labelled data sources, tokenized with the model's own tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.hf.adapter import load_hf_model
from analysis.report import AnalysisConfig, analyze_model
from analysis.run import require_domains
from moe.data import DataConfig, as_data_config, prepare_data

__all__ = ["analyze_hf_model", "check_local_model_dir", "hf_data_config"]

# What `save_pretrained` writes beside config.json for a tokenizer (one of these suffices).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_local_model_dir(name: str) -> None:
    """If `name` is a local path (it exists, or starts like one: /, ./, ../, ~), refuse (ValueError)
    one that is not a Hugging Face model directory, before transformers fails on it obscurely ("need
    sentencepiece or tiktoken"). A Hub name (org/model) passes unchecked."""
    path = Path(name).expanduser()
    if not (path.exists() or name.startswith(("/", "./", "../", "~")) or name in (".", "..")):
        return
    fix = (
        "point model=hf: at a directory written by save_pretrained (config.json, the weights and the "
        "tokenizer files), or at a Hub name such as allenai/OLMoE-1B-7B-0924"
    )
    where = f"model=hf:{name}: {path}"
    if not path.is_dir():
        raise ValueError(f"{where} {'is not a directory' if path.exists() else 'does not exist'}; {fix}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{where} is not a Hugging Face model directory (it has no config.json); {fix}")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(
            f"{where} has a model but no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save the "
            "model's tokenizer into it (tokenizer.save_pretrained(directory))"
        )


def hf_data_config(data: DataConfig | Any, name: str) -> DataConfig:
    """`data` with the tokenizer of model `name`: `tokenizer=bpe` (the default) becomes `hf:<name>`;
    any other tokenizer than the model's is an error (the model reads only its own ids)."""
    cfg = as_data_config(data)
    if cfg.source == "synthetic":
        raise ValueError(
            "data=synthetic yields token ids, not text, so a pretrained model's tokenizer cannot "
            "read it; use data=builtin, data=local or data=hf"
        )
    want = f"hf:{name}"
    if cfg.tokenizer == "bpe":
        cfg.tokenizer = want
    elif cfg.tokenizer != want:
        raise ValueError(
            f"data.tokenizer={cfg.tokenizer!r}, but model=hf:{name} reads only its own tokens; "
            f"leave data.tokenizer unset (it becomes {want!r})"
        )
    return cfg


def analyze_hf_model(
    name: str,
    data: DataConfig | Any,
    out_dir: str | Path,
    cfg: AnalysisConfig | None = None,
    *,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "auto",
    seed: int = 0,
    revision: str | None = None,
) -> dict[str, Any]:
    """Load `name` (Hub name or local directory), prepare `data` with its tokenizer (`seed` splits
    the documents), and write the report of its routing on the validation split into `out_dir`
    (report.md, summary.json, routing.npz, figures/, and data/ with the data manifest).

    Evaluates `data.val_tokens_per_domain` tokens per domain in batches of `batch_size` sequences of
    `data.seq_len`; knockouts use `cfg.knockout_tokens` of them per domain. No dense twin exists, so
    the knockouts have no dense control. Returns the summary dict.
    """
    check_local_model_dir(name)
    data_cfg = hf_data_config(data, name)
    prepared = prepare_data(data_cfg, seed=seed)
    require_domains(prepared.domains, f"the data (data.source={data_cfg.source})")
    val = {d: prepared.val_batches(batch_size=batch_size, domain=d) for d in prepared.domains}
    model = load_hf_model(name, device=device, dtype=dtype, revision=revision)
    top = max(int(b.tokens.max()) for batches in val.values() for b in batches)
    if top >= model.vocab_size:  # a tokenizer with added tokens the embeddings lack
        raise ValueError(
            f"the tokenizer of {name} produced id {top}, outside the model's {model.vocab_size} embedding rows"
        )
    out = Path(out_dir)
    prepared.save(out)
    return analyze_model(
        model,
        val,
        prepared.domains,
        out,
        cfg=cfg,
        model_info=model.describe(),
        data_splits=prepared.split_counts(),
        data_warnings=prepared.manifest.get("warnings"),
    )
