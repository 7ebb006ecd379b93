"""Errors of the `train` package: one root, a few kinds a caller may want to catch.

Every error that stops a run before training starts (a bad ds_config, a data path with
no text, a checkpoint of another model shape) is one of these or an `engine.errors`
EngineError, so the CLI can print one line and exit with code 2 instead of a traceback.
Checkpoint errors are the engine's own classes (the format lives in `engine.checkpoint`),
re-exported here for train's callers.
"""

from __future__ import annotations

from engine.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError

__all__ = ["TrainError", "DSConfigError", "DataError", "CheckpointError", "CheckpointMismatchError",
           "CheckpointNotFoundError"]


class TrainError(Exception):
    """Root of the errors raised by `train/` (checkpoint errors excepted: EngineError's)."""


class DSConfigError(TrainError, ValueError):
    """ds_config.json is missing, malformed, or contradicts the training config."""


class DataError(TrainError, ValueError):
    """A data source does not exist, holds no text, or cannot be parsed."""
