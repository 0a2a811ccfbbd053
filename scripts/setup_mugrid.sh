#!/usr/bin/env bash
# A venv of its own for the muGrid benchmark peer (bench/peers/mugrid_runner.py).
#
# muGrid's PyPI wheel needs numpy >= 2.1, while the project's .venv keeps Debian's
# numpy 1.24 (h5py / petsc4py are built against it), so muGrid lives apart: a venv
# WITHOUT system site packages, from a CPython >= 3.10 (pyenv's if there is one,
# else /usr/bin/python3). The runner talks to the main process through files only.
#
#   bash scripts/setup_mugrid.sh            # creates .venv-mugrid (idempotent)
#   MUGRID_VENV=/elsewhere bash scripts/setup_mugrid.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MUGRID_VENV:-.venv-mugrid}
MUGRID_SPEC=${MUGRID_SPEC:-mugrid}

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import muGrid, numpy, h5py" 2>/dev/null; then
    exit 0
fi

PY=""
for cand in "${MUGRID_PYTHON:-}" "$(command -v python3.12 || true)" "$HOME/.pyenv/versions/3.12.1/bin/python3" \
            "$(command -v python3 || true)" /usr/bin/python3; do
    [[ -n "$cand" && -x "$cand" ]] || continue
    if "$cand" -c "import sys, venv; sys.exit(sys.version_info < (3, 10))" 2>/dev/null; then
        PY=$cand; break
    fi
done
[[ -n "$PY" ]] || { echo "setup_mugrid: no python >= 3.10 with the venv module found" >&2; exit 1; }

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup_mugrid: creating $VENV from $PY (no system site packages)" >&2
    "$PY" -m venv "$VENV"
fi
# Keep the venv out of git without touching the project's .gitignore.
echo '*' > "$VENV/.gitignore"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$MUGRID_SPEC" "numpy>=2.1" h5py
"$VENV/bin/python" -c "import muGrid, numpy; print('setup_mugrid: muGrid', getattr(muGrid, '__version__', '?'), 'numpy', numpy.__version__)"
