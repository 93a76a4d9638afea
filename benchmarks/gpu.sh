#!/usr/bin/env bash
# The GPU benchmark in one command (benchmarks/gpu.py): ViT-B/16 with random weights, every part guarded and
# written as it finishes, within 8 minutes on one H100 (each part's wall-clock budget in benchmarks/gpu.py).
#   benchmarks/gpu.sh                        # on cuda -> reports/benchmark-gpu/ (index.json, a file per part)
#   benchmarks/gpu.sh --device cpu --quick   # every part at the tiny size (what the tests run)
# On a machine whose Python lacks open_clip (a lent GPU machine: torch but no open_clip, ftfy, wcwidth), the
# wheels in .whl/ (bin/device-wheels, run where pip reaches a registry) are installed with pip --no-index --no-deps
# into --target (default $TMPDIR/dynaprompt-wheels), put on PYTHONPATH, and the machine's own torch is used.
#   --target DIR   where the wheels go        --wheels DIR   where they are (default .whl)
#   GPU_SH_WHEELS=always installs them even where open_clip imports (the tests' way into this path)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TARGET=${TMPDIR:-/tmp}/dynaprompt-wheels
WHEELS=.whl
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --target) TARGET=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [ "${GPU_SH_WHEELS:-auto}" = always ] || ! "$PYTHON" -c "import open_clip" 2>/dev/null; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu.sh: open_clip does not import in $PYTHON and $WHEELS holds no wheels: run bin/device-wheels where pip" \
      "reaches a registry, and bring $WHEELS along (the device tool: carry [\".whl\"])" >&2
    exit 2
  fi
  # never torch: --no-deps installs exactly these wheels, and the machine's torch stays the one imported
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" \
    "${wheels[@]}"
  export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
  "$PYTHON" -c "import open_clip" || { echo "gpu.sh: open_clip is in $TARGET but does not import" >&2; exit 2; }
  echo "gpu.sh: ${#wheels[@]} wheels from $WHEELS installed into $TARGET (on PYTHONPATH)"
fi
exec "$PYTHON" -m benchmarks.gpu ${ARGS[@]+"${ARGS[@]}"}
