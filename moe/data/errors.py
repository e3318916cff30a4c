"""Errors of the data pipeline.

Every message names the file, field or setting at fault and says what to do about it, so that a
user reading a traceback does not have to open this package.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data source, file or setting that the pipeline cannot use."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A configured file or directory that does not exist or cannot be read."""


class ValidationDocumentsWarning(UserWarning):
    """A domain has fewer validation documents than `data.min_val_docs_per_domain`: its
    document-level statistics (nulls and intervals that resample documents) will be weak."""


class UpsamplingWarning(UserWarning):
    """The mixture repeats a domain's train text more than `data.max_upsample` times per pass over
    the corpus: the model sees the same few documents over and over and memorizes them."""
