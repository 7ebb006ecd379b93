"""plan: the memory-budget planner behind `folio plan`.

What fits on a given card, with which settings, and what each tier needs: the
component model (settings.py, components.py, activations.py), the search (search.py),
what it writes (output.py), the check against a real run on this machine (measure.py)
and the command line (cli.py). Imports `engine` and `memory_store`, never `train`.
Importing the package (or cli.py) loads neither torch nor the store: `folio --help`
stays fast.
"""

from .errors import InfeasiblePlanError, MeasureUnavailableError, PlanError

__all__ = ["PlanRequest", "PlanReport", "make_plan", "PlanError", "InfeasiblePlanError", "MeasureUnavailableError"]


def __getattr__(name: str):
    if name in ("PlanRequest", "PlanReport", "make_plan"):
        from . import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'plan' has no attribute {name!r}")
