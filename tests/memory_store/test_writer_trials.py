"""scripts/writer_trials.py in the suite: a few races of two real `folio ingest` commands into one store
(the 100-trial run is the script's default: `python scripts/writer_trials.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import writer_trials  # noqa: E402


def test_two_folio_ingest_commands_at_once_one_writes_the_other_is_refused(tmp_path):
    counts = writer_trials.run(4, tmp_path)
    print(f"writer trials: {counts}")
    assert counts["trials"] == counts["refused"] == counts["kills"] == 4

