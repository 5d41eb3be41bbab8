"""
Benchmarks that print ratios against a baseline measured in the same run (machines are noisy). One file per
mode in benchmarks/; every run first prints the machine, versions, date, commit and command it ran with.

    python bench.py --mode layerskip   # early-exit loss memory and time, layer dropout savings
    python bench.py --mode train       # train step tokens/s vs transformers' LlamaForCausalLM (+ MFU on CUDA)
    python bench.py --mode decode [--ckpt out-layerskip]  # batch-1 decoding vs transformers.generate, on the
                                       # same weights; self-speculation on a trained checkpoint
    python bench.py --mode kernels     # each fused op and a whole train step, fused vs unfused (kernels/)
    python bench.py --mode bandwidth   # batch-1 bf16 decoding of TinyLlama-1.1B's shape vs the bandwidth limit
    (--tiny: test-sized shapes, every mode in seconds on a CPU; scripts/gpu_checks.sh runs the GPU set)

CPU: fp32, a TinyLlama-shaped small model (vocab 32000). CUDA: bf16 autocast, TinyLlama-1.1B, seq 2048.
Peak memory: CUDA max_memory_allocated; on CPU each configuration runs in a fresh process and reports
its peak resident set (VmHWM) above the resident set before the measured step.
"""
import argparse
import sys

import torch

from benchmarks import bandwidth, common, decode, kernels, layerskip, train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--mode", choices=("layerskip", "train", "decode", "kernels", "bandwidth"), default="layerskip")
    parser.add_argument("--ckpt", default=None, help="decode mode: a trained checkpoint to speculate with")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="test-sized shapes: a smoke run of any mode")
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.BATCH, common.TINY = args.batch, args.tiny
    if args._memory:  # one configuration's peak memory, in the fresh process memory_in_fresh_process started
        print(common.measure_memory(args._memory))
        return
    print("\n".join(common.header(sys.argv)) + "\n")
    torch.manual_seed(0)
    if args.mode == "decode":
        return decode.bench_decode(args.steps, args.ckpt)
    {"layerskip": layerskip.bench_layerskip, "train": train.bench_train, "kernels": kernels.bench_kernels,
     "bandwidth": bandwidth.bench_bandwidth}[args.mode](args.steps)


if __name__ == "__main__":
    main()
