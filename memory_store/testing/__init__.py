"""memory_store.testing: the pieces the store's fault tests are built from (kept in the package, as
zarr keeps `zarr.testing`, so other suites and scripts can reuse them).

- faults.py: FaultInjector, the seam that fails (ENOSPC, EIO, ...) or ends the process at the N-th
  write, sync or rename memory_store makes;
- crash.py: run a workload in a child process that dies at a chosen call, and enumerate the calls;
- workload.py: a scripted workload and the plain-dict oracle of what each acknowledged flush promised;
- durability.py: audit a traced run for commits that a power cut could break (syncs out of order);
- sigkill.py: a zygote that forks writers to be SIGKILLed and readers beside them, and the trials;
- blocks.py: a small test layout and seeded block contents.

Nothing in memory_store imports this package; it is for tests only.
"""

from .blocks import TEST_LAYOUT, make_blocks
from .crash import ChildResult, CrashRunner, commits_before
from .durability import unsynced_at_commits
from .faults import CRASH_EXIT, Call, Fault, FaultInjector
from .workload import Oracle, StoreState, block_data, check_state, run_script

__all__ = ["FaultInjector", "Fault", "Call", "CRASH_EXIT", "CrashRunner", "ChildResult", "commits_before",
           "unsynced_at_commits", "Oracle", "StoreState", "block_data", "check_state", "run_script",
           "TEST_LAYOUT", "make_blocks"]
