"""Train steps/s of a config's U-Net: ddm (JAX) against diffusers' UNet2DModel (PyTorch) with the same
architecture, loss, optimizer and batch, in one run.

    python benchmarks/train_throughput.py [--configs cifar10_linear,cifar10_cosine] [--batch 8]
                                          [--steps 6] [--dtype float32|bfloat16|both]
                                          [--steps_per_call K] [--skip_torch] [--torch_compile]

Defaults depend on the backend: batch 8, 6 steps, float32, K=2 on CPU; batch 128, 50 steps, both
dtypes, K=4 on GPU. (On CPU the K steps are unrolled and K=1 skips the scan: XLA:CPU's
weight-gradient convolutions are ~10x slower inside a while loop; see cpu_scan_unroll.py.)

cifar10_linear is DDPM's CIFAR-10 run (35.7M parameters, L_simple, dropout 0.1), cifar10_cosine
IDDPM's (3 blocks per level, learned-range variance, L_hybrid, dropout 0.3). Both sides do the
config's step on random images (common.TrainCall: ddm's pmapped K-step call as experiment.train
runs it; common.TorchTrainCall: its PyTorch twin). The timed rounds alternate between the two
frameworks (one call of K steps each), so load from other processes falls on both. bfloat16 means
bf16 compute with float32 parameters: the U-Net's dtype in ddm, autocast in PyTorch. On CUDA,
PyTorch's float32 matmuls are allowed TF32, like XLA's default precision.

ratio = ddm steps/s / diffusers steps/s at the same dtype (median call time of each): > 1 means ddm is
faster. The machine line prints the load average: on a shared machine the per-round ratios show the noise.
"""
import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for PyTorch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository on sys.path)

import jax  # noqa: E402


def main():
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="cifar10_linear,cifar10_cosine")
    parser.add_argument("--batch", type=int, default=8 if on_cpu else 128)
    parser.add_argument("--steps", type=int, default=6 if on_cpu else 50, help="timed steps per framework and dtype")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="float32" if on_cpu else "both")
    parser.add_argument("--steps_per_call", type=int, default=2 if on_cpu else 4)
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the diffusers model")
    args = parser.parse_args()
    k = args.steps_per_call
    rounds = max(1, -(-args.steps // k))
    dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)

    print(common.machine_line())
    if not args.skip_torch:
        import torch

        diffusers = common.import_diffusers_without_torchvision()
        torch.set_float32_matmul_precision("high")
        print(f"torch {torch.__version__} (threads {torch.get_num_threads()}, "
              f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}, "
              f"compile {args.torch_compile}), diffusers {diffusers.__version__}")
    print(f"batch {args.batch}, {rounds * k} timed steps per side (K={k} per call, {rounds} timed calls each)\n")

    rows = []
    for config_name in args.configs.split(","):
        for dtype_name in dtypes:
            tag = f"[{config_name} {dtype_name}]"
            runners = [common.TrainCall(config_name, dtype_name, args.batch, k).ready()]
            if not args.skip_torch:
                runners.append(common.TorchTrainCall(config_name, dtype_name, args.batch, k, args.torch_compile))
            print(f"{tag} params: ddm {common.count_params(runners[0].state.params) // len(runners[0].devices):,}"
                  + ("" if args.skip_torch else f", diffusers {runners[1].num_params:,}")
                  + f"; compile: ddm {runners[0].compile_s:.1f} s"
                  + ("" if args.skip_torch else f", diffusers first call ({k} steps) {runners[1].first_call_s:.1f} s"),
                  flush=True)
            times = common.interleaved(runners, rounds)
            rates = [k / common.median(t) for t in times]  # median call time
            if len(times) > 1:
                per_round = [b / a for a, b in zip(*times)]
                print(f"{tag} per-round ratios ddm/diffusers: {' '.join(f'{r:.2f}' for r in per_round)}")
            flops = runners[0].flops_per_step()
            print(f"{tag} XLA cost analysis: {flops / 1e9:.1f} GFLOP per step, "
                  f"{flops * rates[0] / 1e12:.3f} TFLOP/s achieved by ddm", flush=True)
            rows.append((config_name, "ddm (jax)", dtype_name, rates[0],
                         f"{rates[0] / rates[1]:.2f}" if len(rates) > 1 else ""))
            rows += [(config_name, "diffusers (torch)", dtype_name, rate, "") for rate in rates[1:]]
            del runners

    print(f"\n{'config':<15} | {'framework':<18} | {'dtype':<8} | {'batch':>5} | {'steps/s':>8} | {'ms/step':>9} | ratio")
    for config_name, name, dtype_name, rate, ratio in rows:
        print(f"{config_name:<15} | {name:<18} | {dtype_name:<8} | {args.batch:>5} | {rate:>8.3f} | "
              f"{1e3 / rate:>9.1f} | {ratio}")


if __name__ == "__main__":
    main()
