#!/usr/bin/env bash
# Everything only a GPU shows, in one command (under 8 minutes on one H100/H200), then a summary table:
#   bash scripts/gpu_checks.sh [OUT_DIR]          # logs in OUT_DIR (default gpu-checks/)
#   bash scripts/gpu_checks.sh --tiny [OUT_DIR]   # the same checks at test-sized shapes on a CPU (the test suite
#                                                 # runs this, so the script cannot rot unseen)
# 1. the CUDA-only tests (every compiled decode step recorded as a CUDA graph)
# 2. batch-1 bf16 decoding of TinyLlama-1.1B's shape vs the memory-bandwidth limit, self-speculation, transformers
# 3. a TinyLlama-1.1B training step at seq 2048, the largest batch of 16, 8 that fits: tokens/s and MFU
# 4. the fused kernels' whole-step memory against the unfused compiled model
# 5. the self-speculation benchmark (bench.py --mode speculation; checkpoints out/ and out-plain/ where present)
set -u
cd "$(dirname "$0")/.."
tiny="" steps=6 batches="16 8" models=abc
if [ "${1:-}" = "--tiny" ]; then tiny="--tiny" steps=1 batches=2 models=b; shift; fi
out=${1:-gpu-checks}
rm -rf "$out" && mkdir -p "$out"

check() {  # check NAME COMMAND...: run it, keep its log, remember whether it failed
  local name=$1; shift
  echo "== $name: $*"
  if "$@" > "$out/$name.log" 2>&1; then echo "ok" > "$out/$name.status"; else echo "FAILED" > "$out/$name.status"; fi
  tail -n 25 "$out/$name.log"
}

if [ -n "$tiny" ]; then  # on a CPU the CUDA tests skip; collecting them is the check
  check cuda_tests python3 -m pytest -q tests -k cuda --co
else
  check cuda_tests python3 -m pytest -q tests -k cuda
fi
check bandwidth python3 bench.py --mode bandwidth --steps "$steps" $tiny
for batch in $batches; do  # the largest batch that fits
  check train python3 bench.py --mode train --batch "$batch" --steps "$steps" $tiny
  grep -q "OutOfMemoryError" "$out/train.log" || break
done
check kernels python3 bench.py --mode kernels --steps "$steps" $tiny
check speculation python3 bench.py --mode speculation --models "$models" $tiny

echo
echo "== summary ($out/)"
for f in "$out"/*.status; do
  name=$(basename "$f" .status)
  printf '%-12s %-6s %s\n' "$name" "$(cat "$f")" \
    "$(grep -h -E 'passed|failed|of the bandwidth limit|MFU|tok/s .*transformers|peak step memory|speedup' "$out/$name.log" | tail -n 3 | tr '\n' ' ')"
done
! grep -q FAILED "$out"/*.status
