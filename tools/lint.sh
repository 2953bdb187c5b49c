#!/usr/bin/env bash
# Lints the project's scripts: shellcheck on every shell script, ruff on every Python one,
# found by their first line or extension among the files git tracks in tools/, packaging/ and udev/
# (so a new script is linted without being listed here). tools/test runs it; it needs the
# Debian package of shellcheck, and installs ruff, pinned, into target/tools/ruff from PyPI.
#
#     tools/lint.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RUFF_VERSION=0.17.6

shell=() python=()
while IFS= read -r f; do
    case $f in
        *.py) python+=("$f"); continue ;;
        *.sh) shell+=("$f"); continue ;;
    esac
    case $(head -n1 "$f") in
        '#!'*python*) python+=("$f") ;;
        '#!'*sh) shell+=("$f") ;;
    esac
done < <(git ls-files --cached --others --exclude-standard tools packaging udev)

shellcheck "${shell[@]}"

ruff=target/tools/ruff/bin/ruff
if ! [ -x "$ruff" ] || [ "$("$ruff" --version)" != "ruff $RUFF_VERSION" ]; then
    python3 -m venv target/tools/ruff
    target/tools/ruff/bin/pip install --quiet "ruff==$RUFF_VERSION"
fi
# The pinned version's default rules; no cache in the tree.
"$ruff" check --no-cache --quiet "${python[@]}"
echo "lint: shellcheck ${#shell[@]} shell scripts, ruff ${#python[@]} Python scripts: clean"
