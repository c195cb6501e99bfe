#!/usr/bin/env bash
# The project's two entry points, each creating the pinned environment (.venv) when it is missing:
#   scripts/dev.sh report [options]   the main job: verification and benchmark report (python -m fastdense)
#   scripts/dev.sh test [pytest args] ruff, then the whole test suite, on every core (pytest-xdist; -n 0: one process)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${FASTDENSE_VENV:-.venv}"
stamp="$venv/.requirements.sha256"
wanted="$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]]; then
    echo "setting up $venv from requirements.txt (a minute or two on a fresh machine)" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
    echo "$wanted" > "$stamp"
fi

command="${1:-}"
shift || true
case "$command" in
    report) exec "$venv/bin/python" -m fastdense "$@" ;;
    test)
        "$venv/bin/ruff" check .
        exec "$venv/bin/python" -m pytest -n auto "$@"
        ;;
    *)
        echo "usage: scripts/dev.sh report [options] | test [pytest args]" >&2
        exit 2
        ;;
esac
