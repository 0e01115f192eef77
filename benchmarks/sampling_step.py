"""Samples/s of one DDIM sampling step (U-Net forward + DDIM update): ddm (JAX, jit) against
diffusers' UNet2DModel (PyTorch) with the same architecture, same batch, same dtype, in one run.

    python benchmarks/sampling_step.py [--config cifar10_linear] [--batch 8] [--rounds 7]
                                       [--dtype float32|bfloat16] [--threads N] [--skip_torch]

The step is DDIM eta=0 over 50 respaced steps of the config's diffusion, with clipping of the
predicted x0 (ddm.sampling.ddim_step); PyTorch does the same update with the same formulas after
``model(x, t).sample`` under ``torch.inference_mode``. Calls alternate between the two sides
(one step each) for --rounds rounds after a warm-up; the table gives the median time of a call.
PyTorch uses --threads intra-op threads (default: the CPU cores, as XLA:CPU uses).
Zero-initialised layers of ddm are perturbed so that no branch is trivially zero.

ratio = ddm samples/s / diffusers samples/s: > 1 means ddm is faster.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository on sys.path)

import numpy as np  # noqa: E402

DDIM_STEPS = 50


class TorchRunner:
    """The same step on diffusers' UNet2DModel: eps = model(x, t) (its first C channels); x0 =
    clip(...); DDIM eta=0. ``d`` is the respaced diffusion of the ddm side (SampleCall.diffusion)."""

    def __init__(self, model, d, image_shape, batch, dtype_name, device="cpu"):
        import torch

        self.torch, self.device = torch, torch.device(device)
        torch.manual_seed(0)
        self.net = common.diffusers_unet(model, image_shape[0], image_shape[-1]).eval().to(self.device)
        self.num_params = sum(p.numel() for p in self.net.parameters())
        t = d.num_timesteps // 2
        ab = float(np.asarray(d.alphas_cumprod)[t])
        ab_prev = float(np.asarray(d.alphas_cumprod_prev)[t])
        self.coef = (np.sqrt(1 / ab), np.sqrt(1 / ab - 1), np.sqrt(ab_prev), np.sqrt(1 - ab_prev))
        self.t = torch.full((batch,), int(np.asarray(d.timestep_map)[t]), dtype=torch.long, device=self.device)
        self.x = torch.randn((batch, image_shape[-1]) + tuple(image_shape[:2]), device=self.device)
        self.bf16 = dtype_name == "bfloat16"
        self()

    def __call__(self):
        torch = self.torch
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            eps = self.net(self.x, self.t).sample[:, :self.x.shape[1]].float()
            r_ab, r_ab1, s_prev, s_1m_prev = self.coef
            x0 = (r_ab * self.x - r_ab1 * eps).clamp(-1, 1)
            eps = (r_ab * self.x - x0) / r_ab1
            out = s_prev * x0 + s_1m_prev * eps
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar10_linear")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip_torch", action="store_true")
    args = parser.parse_args()

    print(common.machine_line())
    runners = [common.SampleCall(args.config, args.dtype, args.batch, method="ddim", steps=DDIM_STEPS).ready()]
    model, image_shape = runners[0].model, runners[0].image_shape
    print(f"{args.config}: {common.count_params(runners[0].params):,} parameters (ddm)", end="")
    if not args.skip_torch:
        import torch
        torch.set_num_threads(args.threads)
        runners.append(TorchRunner(model, runners[0].diffusion, image_shape, args.batch, args.dtype))
        print(f", {runners[1].num_params:,} (diffusers); torch {torch.__version__}, {torch.get_num_threads()} threads",
              end="")
    print(f"\nbatch {args.batch}, {args.dtype}, {args.rounds} interleaved rounds of one step per side")
    times = common.interleaved(runners, args.rounds)
    names = ["ddm (jax, jit)", "diffusers (torch, eager)"]
    meds = [common.median(t) for t in times]
    print(f"\n{'framework':<26} | {'ms/step (median)':>16} | {'min':>7} | {'samples/s':>9} | ratio")
    for name, med, t in zip(names, meds, times):
        ratio = f"{meds[1] / meds[0]:.2f}" if len(meds) > 1 and name.startswith("ddm") else ""
        print(f"{name:<26} | {1e3 * med:>16.1f} | {1e3 * min(t):>7.1f} | {args.batch / med:>9.2f} | {ratio}")
    if len(meds) > 1:
        per_round = [b / a for a, b in zip(*times)]
        print(f"per-round ratios: {' '.join(f'{r:.2f}' for r in per_round)}; median {common.median(per_round):.2f}")


if __name__ == "__main__":
    main()
