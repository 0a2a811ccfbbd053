#!/usr/bin/env bash
# Idempotent set-up on Debian 12 (bookworm), as root or with sudo:
#  1. Debian packages: PETSc 3.18 + Open MPI 4.1 + mpi4py + h5py built together;
#  2. a venv (.venv) from /usr/bin/python3 that sees them (--system-site-packages);
#  3. torch pinned exactly (CPU build) and the pure-Python dependencies;
#  4. this package, editable.
# Fast when already done: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.setup-stamp"
REQ_HASH=$(cat requirements.txt constraints.txt setup.py scripts/setup_env.sh | sha256sum | cut -c1-16)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$REQ_HASH" ]] && "$VENV/bin/python" -c "import torch, petsc4py, mpi4py, h5py, solver" 2>/dev/null; then
    exit 0
fi

DEB_PKGS="gcc libc6-dev python3-petsc4py python3-mpi4py python3-h5py python3-numpy python3-scipy python3-yaml python3-venv python3-dev openmpi-bin libopenmpi-dev slurm-wlm munge libtcmalloc-minimal4"
missing=""
for p in $DEB_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [[ -n "$missing" ]]; then
    echo "setup: installing Debian packages:$missing" >&2
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing >/dev/null
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating $VENV from /usr/bin/python3 (with system site packages)" >&2
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
# Debian installs petsc4py under PETSC_DIR, reached through the /usr/lib/petsc
# alternative that only the -dev package sets: point the venv at it directly.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PETSC_PY=$(ls -d /usr/lib/petscdir/petsc3.*/x86_64-linux-gnu-real/lib/python3/dist-packages 2>/dev/null | tail -1 || true)
if [[ -z "$PETSC_PY" ]]; then
    PETSC_PY=$(dirname "$(dirname "$(dpkg -L python3-petsc4py-real3.18 | grep '/petsc4py/__init__.py$' | head -1)")")
fi
echo "$PETSC_PY" > "$SITE/debian-petsc4py.pth"

echo "setup: installing Python dependencies (torch pinned)" >&2
"$VENV/bin/python" -m pip install -q -c constraints.txt -r requirements.txt
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import torch, petsc4py, mpi4py, h5py, solver" 
echo "$REQ_HASH" > "$STAMP"
echo "setup: done ($VENV)" >&2
