#!/usr/bin/env bash
# `make lock`: resolve requirements*.txt afresh in a scratch environment and record every installed version
# (dependencies of dependencies, pip, setuptools and wheel included) in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "lock: the pins are for Python 3.11; $PYTHON is $("$PYTHON" -V 2>&1)" >&2
  exit 1
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$PYTHON" -m venv "$scratch/venv"
# the newest pip, setuptools and wheel, not whichever ones this interpreter's venv module bundles
"$scratch/venv/bin/pip" install --quiet --upgrade pip setuptools wheel
"$scratch/venv/bin/pip" install --quiet -r requirements-dev.txt
{
  echo "# Every package the dev environment installs, at the versions tested together (Python 3.11, Linux x86-64)."
  echo "# requirements*.txt name what we use; this file also fixes what those pull in. Regenerate: make lock"
  "$scratch/venv/bin/pip" freeze --all | grep -v -e '^#' -e '^-e' | LC_ALL=C sort -f
} > "$scratch/constraints.txt"
if ! grep -q '^tensorflow' "$scratch/constraints.txt"; then
  echo "lock: the freeze has no TensorFlow in it; constraints.txt is left as it was" >&2
  exit 1
fi
mv "$scratch/constraints.txt" constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
