"""Errors of the data pipeline.

Every message names the file, field or setting at fault and says what to do about it, so that a
user reading a traceback does not have to open this package.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data source, file or setting that the pipeline cannot use."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A configured file or directory that does not exist or cannot be read."""
