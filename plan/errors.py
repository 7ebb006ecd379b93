"""Errors of the memory-budget planner (`folio plan`).

`PlanError` is the root; a budget that nothing fits raises `InfeasiblePlanError`, whose
message already names the smallest change that would make it fit, so the CLI prints it
as is (never a traceback). Bad argument values raise plain `ValueError` (they are
argument errors, not planning outcomes).
"""

from __future__ import annotations


class PlanError(Exception):
    """Root of the planner's errors."""


class InfeasiblePlanError(PlanError):
    """No setting fits the budget; the message says what would make it fit."""


class MeasureUnavailableError(PlanError, NotImplementedError):
    """`--measure` needs a piece (trainer, inference path) that is not built yet."""
