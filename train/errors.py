"""Errors of the `train` package: one root, a few kinds a caller may want to catch.

Every error that stops a run before training starts (a bad ds_config, a data path with
no text, a checkpoint of another model shape) is one of these, so the CLI can print one
line and exit with code 2 instead of a traceback.
"""

from __future__ import annotations


class TrainError(Exception):
    """Root of the errors raised by `train/`."""


class DSConfigError(TrainError, ValueError):
    """ds_config.json is missing, malformed, or contradicts the training config."""


class DataError(TrainError, ValueError):
    """A data source does not exist, holds no text, or cannot be parsed."""


class CheckpointError(TrainError):
    """A checkpoint or export directory is missing, incomplete or unreadable."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint was written by a model of another shape than the one being built."""
