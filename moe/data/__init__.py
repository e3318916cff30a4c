"""Data pipeline: multi-domain text -> BPE tokens -> packed [B, S] batches that keep, for every
token, the id of its domain and of its document.

    from moe.data import DataConfig, prepare_data
    data = prepare_data(DataConfig(), seed=0)
    stream = data.train_stream(micro_batch_size=8, rank=rank, world_size=world)
    batch = next(stream)                   # Batch: tokens, targets, domain, doc, each int64 [8, 256]
    val = data.val_batches(batch_size=8, domain="math")
    data.split_counts()                    # {"train"|"val": {domain: {"documents": n, "tokens": n}}}
    data.save(run_dir)                     # manifest, tokenizer, validation batches -> run_dir/data/
    data = load_prepared(run_dir)          # what analysis uses
"""

from moe.data.batch import Batch
from moe.data.config import (
    BuiltinSourceConfig,
    DataConfig,
    HFDomainSpec,
    HFSourceConfig,
    LocalSourceConfig,
    SyntheticSourceConfig,
    as_data_config,
)
from moe.data.errors import DataError, DataFileNotFoundError, UpsamplingWarning, ValidationDocumentsWarning
from moe.data.prepare import prepare_data
from moe.data.prepared import DocumentInfo, PreparedData, load_prepared
from moe.data.stream import BatchStream
from moe.data.tokenizer import BPETokenizer, IdTokenizer, PretrainedTokenizer, load_tokenizer

__all__ = [
    "Batch",
    "BatchStream",
    "BPETokenizer",
    "BuiltinSourceConfig",
    "DataConfig",
    "DataError",
    "DataFileNotFoundError",
    "DocumentInfo",
    "HFDomainSpec",
    "HFSourceConfig",
    "IdTokenizer",
    "LocalSourceConfig",
    "PreparedData",
    "PretrainedTokenizer",
    "SyntheticSourceConfig",
    "UpsamplingWarning",
    "ValidationDocumentsWarning",
    "as_data_config",
    "load_prepared",
    "load_tokenizer",
    "prepare_data",
]
