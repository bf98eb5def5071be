#!/usr/bin/env bash
# `make gpu-check`: the one command for a GPU machine without network, from the repository root. The packages the
# machine lacks travel as wheels in .whl/, pytest's among them (`../shared/gpu/wheels.sh pytest iniconfig pluggy
# pygments packaging` on a machine with the registries); they go to /tmp/site unless they import already. Then
# scripts/gpu_check.py runs the pieces (`--dry-run` prints them, `--tiny` runs them at CPU sizes, `--help` for the
# rest) into $OUT when set, else results/gpu_check/<time>. PYTHON picks the interpreter (default python3).
set -euo pipefail
export GPU_CHECK_STARTED=$(date +%s)  # the budget counts from here: installing the wheels is inside it
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
case " $* " in  # printing the plan needs no packages
  *" --dry-run "* | *" --help "* | *" -h "*) exec "$PYTHON" scripts/gpu_check.py "$@" ;;
esac
if ! "$PYTHON" -c "import open_clip, webdataset, fvcore, pytest" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
      || echo "gpu_check.sh: installing .whl/ failed; the pieces will say what is missing" >&2
  else
    echo "gpu_check.sh: open_clip, webdataset, fvcore or pytest missing and no .whl/ (../shared/gpu/README.md)" >&2
  fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
