"""Train steps/s of the DDPM CIFAR-10 U-Net (35.7M parameters): ddm (JAX) against diffusers' UNet2DModel (PyTorch).

    python benchmarks/train_throughput.py [--batch 8] [--steps 4] [--dtype float32|bfloat16|both]
                                          [--steps_per_call K] [--skip_torch] [--torch_compile]

Defaults depend on the backend: batch 8, 4 steps, float32, K=2 on CPU; batch 128, 50 steps, both
dtypes, K=4 on GPU. (On CPU the K steps are unrolled and K=1 skips the scan: XLA:CPU's
weight-gradient convolutions are ~10x slower inside a while loop; see cpu_scan_unroll.py.)

Both sides do the same train step on random images in [-1, 1]: t ~ U[0, 1000), x_t = q_sample(x_0,
t, eps), the model with dropout 0.1 active, MSE to eps, backward, global-norm gradient clipping at 1,
Adam(2e-4) and an EMA of the parameters at 0.9999. The diffusers model uses
google/ddpm-cifar10-32's configuration. The timed rounds alternate between the two frameworks (one
call of K steps each), so load from other processes falls on both. bfloat16 means bf16 compute with
float32 parameters: the U-Net's dtype in ddm, autocast in PyTorch. On CUDA, PyTorch's float32
matmuls are allowed TF32, like XLA's default precision.

ratio = ddm steps/s / diffusers steps/s at the same dtype (median call time of each): > 1 means ddm is
faster. The machine line prints the load average: on a shared machine the per-round ratios show the noise.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for PyTorch

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts the repository on sys.path)

import ddm  # noqa: E402
from ddm import train  # noqa: E402
from ddm.timestep_sampling import uniform_sampler
from ddm.unet import UNet

T = 1000
LR, CLIP, EMA = 2e-4, 1.0, 0.9999
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class JaxRunner:
    """ddm's pmapped K-step train call on (num_devices, K, batch / num_devices) random images."""

    def __init__(self, dtype_name, batch, k):
        dtype = DTYPES[dtype_name]
        model = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, dtype=dtype)
        diffusion = ddm.make_diffusion(ddm.get_betas("linear", T), "eps", "fixed_large", "mse")
        sampler = uniform_sampler(T)
        optimizer = train.make_optimizer(LR, warmup_steps=0, grad_clip=CLIP)
        state = train.create_train_state(model, optimizer, sampler, jax.random.PRNGKey(0), (32, 32, 3), ema_rates=(EMA,))
        self.num_params = sum(p.size for p in jax.tree_util.tree_leaves(state.params))
        step_fn = train.make_train_step(model, diffusion, sampler, optimizer, (EMA,), dtype)
        multi = train.make_multi_step(step_fn, unroll=jax.default_backend() == "cpu")
        devices = jax.local_devices()
        if batch % len(devices):
            raise ValueError(f"--batch {batch} must be a multiple of the {len(devices)} local devices")
        shape = (len(devices), k, batch // len(devices))
        rng = np.random.default_rng(0)
        sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (train.AXIS,)),
                                              jax.sharding.PartitionSpec(train.AXIS))
        self.batch = jax.device_put({"image": rng.uniform(-1, 1, shape + (32, 32, 3)).astype(np.float32),
                                     "label": np.zeros(shape, np.int32)}, sharding)
        self.state = train.replicate(state)
        start = time.perf_counter()
        self.call = multi.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        cost = self.call.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        # XLA counts a while loop's body once: a scanned call reports one step, an unrolled one K steps.
        unrolled = jax.default_backend() == "cpu"
        self.flops_per_step = cost.get("flops", 0.0) * len(devices) / (k if unrolled else 1) if cost else 0.0
        self()  # warm-up

    def __call__(self):
        self.state, metrics = self.call(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))


class TorchRunner:
    """The same train step on diffusers' UNet2DModel, K steps per call."""

    def __init__(self, dtype_name, batch, k, use_compile):
        import torch

        from common import import_diffusers_without_torchvision
        import_diffusers_without_torchvision()
        from diffusers import UNet2DModel

        self.torch, self.k = torch, k
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        self.model = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
            layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
            norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=0.1,
        ).to(self.device).train()
        self.params = list(self.model.parameters())
        self.num_params = sum(p.numel() for p in self.params)
        self.ema = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.Adam(self.params, lr=LR)
        self.forward = torch.compile(self.model) if use_compile else self.model
        self.bf16 = dtype_name == "bfloat16"
        alphas_cumprod = np.cumprod(1.0 - ddm.get_betas("linear", T))
        self.sqrt_ac = torch.tensor(np.sqrt(alphas_cumprod), dtype=torch.float32, device=self.device)
        self.sqrt_1m_ac = torch.tensor(np.sqrt(1.0 - alphas_cumprod), dtype=torch.float32, device=self.device)
        self.x0 = torch.rand(batch, 3, 32, 32, device=self.device) * 2 - 1
        start = time.perf_counter()
        self()
        self.first_call_s = time.perf_counter() - start

    def step(self):
        torch, x0 = self.torch, self.x0
        t = torch.randint(0, T, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        x_t = self.sqrt_ac[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            eps = self.forward(x_t, t).sample
        loss = torch.nn.functional.mse_loss(eps.float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_mul_(self.ema, EMA)
            torch._foreach_add_(self.ema, self.params, alpha=1.0 - EMA)

    def __call__(self):
        for _ in range(self.k):
            self.step()
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def timed_rounds(runners, rounds):
    """Seconds of each call, per runner, over `rounds` alternating calls."""
    return common.interleaved(runners, rounds)


def main():
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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

    print(f"device: {jax.devices()[0].device_kind} x{jax.local_device_count()} ({jax.default_backend()}), "
          f"jax {jax.__version__}, CPU cores {os.cpu_count()}")
    if not args.skip_torch:
        import torch

        from common import import_diffusers_without_torchvision
        diffusers = import_diffusers_without_torchvision()
        torch.set_float32_matmul_precision("high")
        print(f"torch {torch.__version__} (threads {torch.get_num_threads()}, "
              f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}, "
              f"compile {args.torch_compile}), diffusers {diffusers.__version__}")
    print(f"batch {args.batch}, {rounds * k} timed steps per side (K={k} per call, {rounds} timed calls each)\n")

    rows = []
    for dtype_name in dtypes:
        runners = [JaxRunner(dtype_name, args.batch, k)]
        if not args.skip_torch:
            runners.append(TorchRunner(dtype_name, args.batch, k, args.torch_compile))
        print(f"[{dtype_name}] params: ddm {runners[0].num_params:,}"
              + ("" if args.skip_torch else f", diffusers {runners[1].num_params:,}")
              + f"; compile: ddm {runners[0].compile_s:.1f} s"
              + ("" if args.skip_torch else f", diffusers first call ({k} steps) {runners[1].first_call_s:.1f} s"))
        times = timed_rounds(runners, rounds)
        rates = [k / common.median(t) for t in times]  # median call time
        if len(times) > 1:
            per_round = [b / a for a, b in zip(*times)]
            print(f"[{dtype_name}] per-round ratios ddm/diffusers: {' '.join(f'{r:.2f}' for r in per_round)}")
        flops = runners[0].flops_per_step
        if flops:
            print(f"[{dtype_name}] XLA cost analysis: {flops / 1e9:.1f} GFLOP per step, "
                  f"{flops * rates[0] / 1e12:.3f} TFLOP/s achieved by ddm")
        rows.append(("ddm (jax)", dtype_name, rates[0], f"{rates[0] / rates[1]:.2f}" if len(rates) > 1 else ""))
        rows += [("diffusers (torch)", dtype_name, rate, "") for rate in rates[1:]]
        del runners

    print(f"\n{'framework':<18} | {'dtype':<8} | {'batch':>5} | {'steps/s':>8} | {'ms/step':>9} | ratio")
    for name, dtype_name, rate, ratio in rows:
        print(f"{name:<18} | {dtype_name:<8} | {args.batch:>5} | {rate:>8.3f} | {1e3 / rate:>9.1f} | {ratio}")


if __name__ == "__main__":
    main()
