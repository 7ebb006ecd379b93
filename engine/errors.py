"""The engine's error hierarchy: one root, one class per way things go wrong.

Every error the engine raises on purpose for a bad checkpoint or model derives from
`EngineError`; each also derives from the builtin a caller would expect (ValueError,
FileNotFoundError), as memory_store's do. Messages say what was wrong and what is allowed.
"""

from __future__ import annotations

__all__ = ["EngineError", "CheckpointError", "CheckpointNotFoundError", "UnsupportedCheckpointError",
           "ModelMismatchError", "CheckpointMismatchError"]


class EngineError(Exception):
    """Root of every error raised on purpose by engine."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint's files are missing, inconsistent or not what they claim."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (Folio model, Hugging Face directory or GGUF file) at the given path."""


class UnsupportedCheckpointError(CheckpointError):
    """A checkpoint of an architecture, or with a field, that Folio does not implement."""


class ModelMismatchError(EngineError, ValueError):
    """The model does not fit what it is used with (a store, a retrieval mode)."""


class CheckpointMismatchError(CheckpointError, ModelMismatchError):
    """A checkpoint's parts disagree (weights written for another config), or it holds another
    model than the one being built or resumed."""
