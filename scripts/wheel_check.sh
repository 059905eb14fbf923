#!/usr/bin/env bash
# The path of a user who installs from a wheel (issue 16): build the wheel, install it
# non-editable into a fresh venv, then, from an empty temporary directory, run verify,
# reproduce, a one-epoch train and generate. The shipped data must come from the installed
# package, and nothing may be written into it (reports and runs go under the current directory).
# Usage: scripts/wheel_check.sh   (run by .ci/run and the GitHub workflow)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo"
python3 -m venv "$work/venv"
# Through the lock of the venv's Python (requirements/test-py3.X.lock): the wheel's dependencies at the
# test environment's versions. torch first and pinned: the CPU build on this machine's disk (a bare
# "torch" pulls CUDA)
lock="$repo/requirements/test-py$("$work/venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])').lock"
"$work/venv/bin/python" -m pip install --quiet -c "$lock" torch==2.13.0
"$work/venv/bin/python" -m pip install --quiet -c "$lock" "$work"/dist/*.whl

cd "$work" && mkdir user && cd user
export PATH="$work/venv/bin:$PATH"
package="$(python -c 'import pathlib, qformer_lora; print(pathlib.Path(qformer_lora.__file__).parent)')"
case "$package" in "$repo"*) echo "wheel check: imported the checkout ($package), not the wheel" >&2; exit 1;; esac
before="$(find "$package" -type f -not -name '*.pyc' | sort | md5sum)"

qformer-lora verify >verify.txt
qformer-lora reproduce --out reports
qformer-lora train --epochs 1 --output-dir runs/one-epoch
qformer-lora generate runs/one-epoch --limit 4 | tee answers.txt

test -s reports/REPRODUCTION.json && test -s reports/REPRODUCTION.md
test -n "$(ls runs/one-epoch/checkpoints)"
test "$(wc -l <answers.txt)" -eq 4
after="$(find "$package" -type f -not -name '*.pyc' | sort | md5sum)"
if [ "$before" != "$after" ]; then
  echo "wheel check: files were written into the installed package $package" >&2
  exit 1
fi
echo "wheel check passed: verify, reproduce, train and generate from $(pwd) with the installed wheel"
