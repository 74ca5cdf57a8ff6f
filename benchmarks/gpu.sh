#!/usr/bin/env bash
# The speed benchmark on a CUDA GPU (issue 18, item 5): bf16 autocast, channels_last, cudnn.benchmark, pinned memory
# and non-blocking copies (finetune does both on CUDA), torch.compile rows beside eager, fast inference on/off; the
# table, headed by the card's name, goes to benchmarks/results/gpu.md (and stdout).
#
#   bash benchmarks/gpu.sh              # on a machine with an NVIDIA GPU (about 5-10 minutes)
#   bash benchmarks/gpu.sh --dry-run    # anywhere: checks the environment and runs the script's code paths on the
#                                       # CPU at tiny sizes (no torch.compile rows), writing results/gpu-dry-run.md
#
# PYTHON overrides the interpreter (default: python3 on PATH, or the repository's .venv when there is one).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py="python3"; fi
fi
dry=0
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$a' (use --dry-run or nothing)" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
"$py" - <<'PY'
import torch, torchvision, timm
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PY
if [[ $dry -eq 1 ]]; then
  exec "$py" "$here/gpu_bench.py" --dry-run --out "$here/results/gpu-dry-run.md"
fi
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: no CUDA device here; run it on a GPU machine (or use --dry-run to check the script)" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$py" "$here/gpu_bench.py" --out "$here/results/gpu.md"
