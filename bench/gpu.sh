#!/usr/bin/env bash
# bench/gpu.sh RESULTS_DIR — figure 7 of the benchmarks on one CUDA GPU (H100/H200), in < 8 minutes.
#
# Needs nothing from the internet: it uses the machine's own python3 with PyTorch and makes
# `import cldlr` work through a folder of symlinks (no pip install; the pinned stack of
# pyproject.toml is for the CPU venv). Packages the GPU figures need but the machine lacks
# can travel as wheels in REPO/.whl (installed with --no-index into a temporary folder).
#
#   CLDLR_BUSBRA=/path/to/bus-bra   use BUS-BRA's BI-RADS 4 lesions (else a synthetic cohort of 485 + 208);
#                                   then also step 5, the deep-feature ablation's best arm at 224 px
#                                   (CLDLR_BENCH_ARMS; CLDLR_BENCH_ABLATION=0 skips it)
#   CLDLR_BENCH_DRY=1               toy sizes on whatever device there is: checks the script, measures nothing
#   PYTHON=/path/to/python          the interpreter to use (default: the first one whose torch sees CUDA)
set -euo pipefail

out=${1:?usage: bench/gpu.sh RESULTS_DIR}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cldlr-gpu-sh.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# 1. an interpreter with torch, preferring one that sees a GPU
py=${PYTHON:-}
if [[ -z $py ]]; then
  fallback=
  for candidate in python3 /opt/torch/.venv/bin/python3 "$repo/.venv/bin/python" python; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      py=$candidate; break
    fi
    if [[ -z $fallback ]] && "$candidate" -c 'import torch' 2>/dev/null; then fallback=$candidate; fi
  done
  py=${py:-$fallback}
fi
if [[ -z $py ]]; then
  echo "gpu.sh: no python with torch found; set PYTHON=/path/to/python (torch, torchvision inside)" >&2
  exit 2
fi
echo "gpu.sh: using $py ($("$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'))"

# 2. `import cldlr` from this checkout: the package maps folders (common/, client/, ...) to cldlr.*
mkdir -p "$tmp/pkg/cldlr"
ln -s "$repo/cldlr/__init__.py" "$tmp/pkg/cldlr/__init__.py"
for sub in common client server simulations; do ln -s "$repo/$sub" "$tmp/pkg/cldlr/$sub"; done
export PYTHONPATH="$tmp/pkg:$repo/bench${PYTHONPATH:+:$PYTHONPATH}"

# 3. what the GPU figures import; missing ones from carried wheels, if any
need="torch torchvision numpy PIL sklearn scipy pandas yaml safetensors tqdm contourpy"
missing=$("$py" - $need <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n $missing ]]; then
  if compgen -G "$repo/.whl/*.whl" >/dev/null; then
    echo "gpu.sh: installing carried wheels for: $missing"
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" "$repo"/.whl/*.whl
    export PYTHONPATH="$tmp/site:$PYTHONPATH"
  else
    echo "gpu.sh: missing Python packages: $missing (no internet here: carry wheels in $repo/.whl)" >&2
    exit 2
  fi
fi

# 4. the measurements, under a hard limit that keeps the whole script inside 8 minutes
mkdir -p "$out"
export PYTHONUNBUFFERED=1
rc=0
timeout --signal=INT --kill-after=20 "${CLDLR_BENCH_TIMEOUT_S:-420}" "$py" "$repo/bench/gpu.py" "$out" || rc=$?

# 5. the deep-feature ablation's best arm at the paper's 224 px (docs/RESULTS.md, issue 16), when BUS-BRA is
#    on the machine: CLDLR_BENCH_ARMS (default below) over 5 splits, resumable, table in RESULTS_DIR/ablation-224
if [[ -n ${CLDLR_BUSBRA:-} && -f ${CLDLR_BUSBRA}/bus_data.csv && ${CLDLR_BENCH_ABLATION:-1} == 1 ]]; then
  abl="$out/ablation-224"
  if [[ ! -d $abl/bi4 ]]; then
    "$py" -c 'import sys; from cldlr.client.importers.bus_bra import import_bus_bra as i
i(sys.argv[1], sys.argv[2] + "/bi4", birads=[4], sites="single")
i(sys.argv[1], sys.argv[2] + "/archive", birads=[2, 3, 5], sites="single")' "$CLDLR_BUSBRA" "$abl"
  fi
  if [[ ${CLDLR_BENCH_DRY:-0} == 1 ]]; then  # the same wiring at toy sizes: one split, one arm, 32 px, 1 epoch
    splits=1 arms=${CLDLR_BENCH_ARMS:-scratch-paper} sets="data.image_size=32 train.epochs=1"
  else
    splits=5 arms=${CLDLR_BENCH_ARMS:-scratch-paper pretrained-hold-out pretrained-stack}
    sets="data.image_size=224 train.device=cuda"
  fi
  # shellcheck disable=SC2086 # the arms and settings are word lists
  (cd "$repo" && timeout --signal=INT --kill-after=20 "${CLDLR_BENCH_ABLATION_TIMEOUT_S:-240}" "$py" \
     bench/ablation_deep.py --bi4 "$abl/bi4" --archive "$abl/archive" --out "$abl/runs" --splits "$splits" \
     --arms $arms --set $sets) | tee "$abl/table.md" || rc=$?
fi
exit $rc
