"""
Benchmarks that print ratios against a baseline measured in the same run (machines are noisy). One file per
mode in benchmarks/; every run first prints the machine, versions, date, commit and command it ran with.

    python bench.py --mode layerskip   # early-exit loss memory and time, layer dropout savings
    python bench.py --mode train       # train step tokens/s vs transformers' LlamaForCausalLM (+ MFU on CUDA)
    python bench.py --mode decode [--ckpt out-layerskip]  # batch-1 decoding vs transformers.generate, on the
                                       # same weights; self-speculation on a trained checkpoint
    python bench.py --mode kernels     # each fused op and a whole train step, fused vs unfused (fused/)
    python bench.py --mode bandwidth [--ckpt DIR] [--dtype bfloat16]  # batch-1 decoding of TinyLlama-1.1B's shape
                                       # (or a converted checkpoint, with verification costs and self-speculation)
                                       # vs the bandwidth limit measured in the run
    python bench.py --mode speculation [--ckpt out] [--plain_ckpt out-plain] [--models abc]  # does self-speculation
                                       # pay: speedup, acceptance and fraction of ideal (benchmarks/speculation.py)
    (--tiny: test-sized shapes, every mode in seconds on a CPU; scripts/gpu_checks.sh runs the GPU set)

CPU: fp32, a TinyLlama-shaped small model (vocab 32000). CUDA: bf16 autocast, TinyLlama-1.1B, seq 2048.
Peak memory: CUDA max_memory_allocated; on CPU each configuration runs in a fresh process and reports
its peak resident set (VmHWM) above the resident set before the measured step.
"""
import argparse
import sys

import torch

from benchmarks import bandwidth, common, decode, kernels, layerskip, speculation, train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mode", choices=("layerskip", "train", "decode", "kernels", "bandwidth", "speculation"),
                        default="layerskip")
    parser.add_argument("--ckpt", default=None, help="decode mode: a trained checkpoint to speculate with; "
                        "speculation mode: the LayerSkip-trained checkpoint (default: out, README's job); "
                        "bandwidth mode: a converted checkpoint (e.g. SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="bandwidth mode: the "
                        "weights' dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--plain_ckpt", default="out-plain", help="speculation mode: a checkpoint trained "
                        "without LayerSkip, for skip-plan drafts")
    parser.add_argument("--models", default="abc", help="speculation mode: which of (a) LayerSkip checkpoint, (b) "
                        "TinyLlama-shaped random Llama, (c) plain checkpoint to run")
    parser.add_argument("--new_tokens", type=int, default=64, help="speculation mode: tokens generated per prompt")
    parser.add_argument("--eager", action="store_true", help="speculation mode: eager decode steps, not compiled")
    parser.add_argument("--repeats", type=int, default=2, help="speculation and bandwidth modes: timed calls of each prompt and "
                        "setting, the shortest kept (more: closer to what the code can do on a noisy machine)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="test-sized shapes: a smoke run of any mode")
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    common.BATCH, common.TINY = args.batch, args.tiny
    if args._memory:  # one configuration's peak memory, in the fresh process memory_in_fresh_process started
        print(common.measure_memory(args._memory))
        return
    print("\n".join(common.header(sys.argv)) + "\n")
    torch.manual_seed(0)
    if args.mode == "decode":
        return decode.bench_decode(args.steps, args.ckpt)
    if args.mode == "bandwidth":
        return bandwidth.bench_bandwidth(args.repeats, args.ckpt, args.dtype and getattr(torch, args.dtype))
    if args.mode == "speculation":
        return speculation.bench_speculation(args.ckpt or "out", args.plain_ckpt, args.new_tokens, args.repeats,
                                             not args.eager, args.models)
    {"layerskip": layerskip.bench_layerskip, "train": train.bench_train,
     "kernels": kernels.bench_kernels}[args.mode](args.steps)


if __name__ == "__main__":
    main()
