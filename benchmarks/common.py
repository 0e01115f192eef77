"""Shared pieces of the benchmarks: the U-Net of a config, its diffusers (PyTorch) twin, the hand
FLOP count, peak FLOP/s tables, and interleaved timing.

Import it from a benchmark script (they put this folder on sys.path) or from a test with
``importlib``; it is not part of the ``ddm`` package.
"""
import contextlib
import functools
import importlib
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from ddm import experiment
from ddm.unet import NinShortcut

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Dense peak FLOP/s per chip from the vendors' data sheets (no sparsity), by compute dtype. Matched
# against jax's device_kind by substring, first match wins. fp32 on NVIDIA is the non-tensor-core
# rate; XLA's default float32 matmul precision on Ampere+ may use TF32 (tf32 column), so MFU of a
# float32 run is quoted against both where they differ.
PEAK_TFLOPS = [
    # (device_kind substring, {dtype: TFLOP/s})
    ("H200", {"bfloat16": 989.0, "float32": 67.0, "tf32": 494.5}),
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 51.0, "tf32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float32": 67.0, "tf32": 494.5}),  # SXM
    ("A100", {"bfloat16": 312.0, "float32": 19.5, "tf32": 156.0}),
    ("L4", {"bfloat16": 121.0, "float32": 30.3, "tf32": 60.0}),
    ("A10G", {"bfloat16": 70.0, "float32": 31.2, "tf32": 35.0}),
    ("V100", {"bfloat16": 0.0, "float32": 15.7, "float16": 125.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v6", {"bfloat16": 918.0, "float32": 918.0}),
    ("TPU v3", {"bfloat16": 123.0, "float32": 123.0}),
]


def table_peak(device_kind: str, dtype_name: str):
    """(peak FLOP/s, source string) from PEAK_TFLOPS, or (None, reason)."""
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            value = peaks.get(dtype_name)
            if value:
                return value * 1e12, f"table: {name} {dtype_name} dense {value:g} TFLOP/s"
    return None, f"no table entry for {device_kind!r}"


def mfu_text(flops_per_s: float, dtype_name: str) -> str:
    """MFU of ``flops_per_s`` against the default device's table peak (float32 against both the
    fp32 and the TF32 peak), as text; on CPU it points to flops.py's measured peak instead."""
    kind = jax.devices()[0].device_kind
    if jax.default_backend() == "cpu":
        return "n/a (CPU: see benchmarks/flops.py for a measured CPU peak)"
    parts = []
    for key in ((dtype_name, "tf32") if dtype_name == "float32" else (dtype_name,)):
        peak, source = table_peak(kind, key)
        if peak:
            parts.append(f"{100 * flops_per_s / peak:.1f}% of {source}")
    return "; ".join(parts) or f"n/a (no table entry for {kind!r})"


def measured_matmul_peak(dtype=jnp.float32, sizes=(1024, 2048), repeats=5):
    """Best FLOP/s of jitted square matmuls on the default device (the CPU 'peak' used for MFU)."""
    best = 0.0
    for n in sizes:
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
        f = jax.jit(lambda x: x @ x)
        jax.block_until_ready(f(a))
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(f(a))
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def device_peak(dtype_name: str):
    """(peak FLOP/s, source): the table for accelerators, a measured matmul peak on CPU."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        peak = measured_matmul_peak(DTYPES[dtype_name])
        return peak, f"measured: best {dtype_name} 1024/2048 square matmul on this CPU ({peak / 1e9:.1f} GFLOP/s)"
    return table_peak(device.device_kind, dtype_name)


def load_config(name: str):
    """configs/<name>.py's config ('cifar10_linear', 'cifar10_cosine', ...)."""
    return importlib.import_module(f"configs.{name}").get_config()


def build(config_name: str, dtype_name: str = "float32", **model_overrides):
    """(config, model, diffusion, image_shape) for a config, the model's dtype set to dtype_name."""
    config = load_config(config_name)
    config.model.dtype = dtype_name
    for key, value in model_overrides.items():
        config.model[key] = value
    channels = 1 if config.data.name == "digits" else 3
    image_shape = (config.data.image_size, config.data.image_size, channels)
    model = experiment.build_model(config, channels)
    diffusion = experiment.build_diffusion(config)
    return config, model, diffusion, image_shape


# --------------------------------------------------------------------------------------------- #
# Hand FLOP count.
# --------------------------------------------------------------------------------------------- #

def _taps(n_in: int, k: int, stride: int) -> int:
    """Kernel taps that land inside the input, summed over the output positions of one axis, for
    a TF 'SAME' conv (padding is not counted, as XLA's cost analysis does not count it)."""
    n_out = -(-n_in // stride)
    pad_total = max((n_out - 1) * stride + k - n_in, 0)
    lo = pad_total // 2
    return sum(1 for o in range(n_out) for j in range(k) if 0 <= o * stride + j - lo < n_in)


def unet_forward_macs(model, image_shape, batch: int = 1, count_padding: bool = False) -> dict:
    """Multiply-accumulates of one U-Net forward, by kind, walking the module's structure.

    Counts the convolutions (the upsampling ones as ``ddm.unet.upsample_conv`` computes them: four
    2x2 convs over the input, 16 taps per input pixel where the upsampled 3x3 conv has 36), the
    dense layers (timestep MLP, res blocks' temb projections and 1x1 shortcuts, attention
    q/k/v/out) and the two attention matmuls; elementwise work (norms, activations, softmax,
    additions) is left out. Returns {'conv', 'dense', 'attention',
    'conv_in'} in MACs for ``batch`` images (2 * MACs = FLOPs).
    """
    h_size, w_size, c_in = image_shape
    out_channels = model.out_channels or c_in
    ch, levels = model.ch, len(model.ch_mult)
    macs = {"conv": 0, "dense": 0, "attention": 0, "conv_in": 0}
    emb_ch = 4 * ch

    def conv(h, w, cin, cout, k=3, stride=1, kind="conv"):
        if count_padding:
            taps = (-(-h // stride)) * k * (-(-w // stride)) * k
        else:
            taps = _taps(h, k, stride) * _taps(w, k, stride)
        macs[kind] += batch * taps * cin * cout
        return -(-h // stride), -(-w // stride)

    def upsample_conv(h, w, cin, cout):
        # ddm.unet.upsample_conv: four 2x2 convs over the (h, w) input, one per output phase. Along
        # an axis of h pixels each phase has 2h taps, one of them in the padding: 2 (2h - 1) in all.
        taps = 16 * h * w if count_padding else (4 * h - 2) * (4 * w - 2)
        macs["conv"] += batch * taps * cin * cout
        return 2 * h, 2 * w

    def dense(n, cin, cout):
        macs["dense"] += batch * n * cin * cout

    def res_block(h, w, cin, cout, resample=None):
        if resample == "up":
            h, w = upsample_conv(h, w, cin, cout)
        else:
            if resample == "down":
                h, w = h // 2, w // 2
            conv(h, w, cin, cout)
        dense(1, emb_ch, 2 * cout if model.scale_shift_norm else cout)
        conv(h, w, cout, cout)
        if cin != cout:
            if model.conv_shortcut:
                conv(h, w, cin, cout)
            else:
                dense(h * w, cin, cout)
        return h, w

    def attn(h, w, c):
        n = h * w
        dense(n, c, 3 * c)  # q, k, v
        dense(n, c, c)  # proj_out
        macs["attention"] += batch * 2 * n * n * c  # q k^T and weights v, over all heads

    dense(1, ch, emb_ch)
    dense(1, emb_ch, emb_ch)
    h, w = conv(h_size, w_size, c_in, ch, kind="conv_in")
    c = ch
    skips = [c]
    for level, mult in enumerate(model.ch_mult):
        for _ in range(model.num_res_blocks):
            h, w = res_block(h, w, c, ch * mult)
            c = ch * mult
            if h in model.attn_resolutions:
                attn(h, w, c)
            skips.append(c)
        if level != levels - 1:
            if model.resblock_updown:
                h, w = res_block(h, w, c, c, "down")
            elif model.resamp_with_conv:
                h, w = conv(h, w, c, c, stride=2)
            else:
                h, w = h // 2, w // 2
            skips.append(c)
    h, w = res_block(h, w, c, c)
    attn(h, w, c)
    h, w = res_block(h, w, c, c)
    for level in reversed(range(levels)):
        for _ in range(model.num_res_blocks + 1):
            h, w = res_block(h, w, c + skips.pop(), ch * model.ch_mult[level])
            c = ch * model.ch_mult[level]
            if h in model.attn_resolutions:
                attn(h, w, c)
        if level != 0:
            if model.resblock_updown:
                h, w = res_block(h, w, c, c, "up")
            elif model.resamp_with_conv:
                h, w = upsample_conv(h, w, c, c)
            else:
                h, w = h * 2, w * 2
    conv(h, w, c, out_channels)
    return macs


def hand_flops(model, image_shape, batch: int = 1, count_padding: bool = False, wgrad_padding: bool = False) -> dict:
    """FLOPs (2 * MACs) of the forward and of the train step's forward + backward.

    Backward = the gradient with respect to the activations (one forward's MACs, except for
    conv_in, whose input, the noisy image, needs no gradient) plus the gradient with respect to the
    weights (another forward's MACs); the attention matmuls likewise cost 2x forward in backward.
    So train = 3 * forward - conv_in. With ``wgrad_padding`` the kernel gradients count the taps in
    the padding, as the per-tap matmuls of ``kernel_grad_by_taps`` below do (XLA's convolutions,
    which ddm.unet uses, skip them; the upsampling convs, which keep XLA's kernel gradient under
    ``kernel_grad_by_taps``, are counted with their padding taps then too). Optimizer, EMA, norms and
    activations are not counted.
    """
    macs = unet_forward_macs(model, image_shape, batch, count_padding)
    wgrad = unet_forward_macs(model, image_shape, batch, count_padding or wgrad_padding)
    forward = 2 * sum(macs.values())
    train = forward + (forward - 2 * macs["conv_in"]) + 2 * sum(wgrad.values())
    return {"forward": forward, "train": train, "macs": macs}


def count_params(tree) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------------------------- #
# The PyTorch peer.
# --------------------------------------------------------------------------------------------- #

def import_diffusers_without_torchvision():
    """Import diffusers with torchvision marked absent. In this venv torchvision 0.28's C extension
    does not load against torch 2.13 ('operator torchvision::nms does not exist'), and diffusers
    imports torchvision (for a model the U-Net does not use) when it is installed."""
    import diffusers.utils.import_utils as import_utils

    import_utils._torchvision_available = False
    import diffusers

    return diffusers


def diffusers_unet(model, image_size: int, in_channels: int = 3):
    """diffusers' UNet2DModel with the same architecture as ``model`` (a DDPM-style ddm UNet: one
    attention head, no scale-shift norm, conv resampling). DDPM CIFAR-10's is google/ddpm-cifar10-32's
    configuration; other configs change the blocks per level, dropout and output channels."""
    import_diffusers_without_torchvision()
    from diffusers import UNet2DModel

    if model.scale_shift_norm or model.resblock_updown or not model.resamp_with_conv:
        raise ValueError("diffusers_unet: only DDPM-style U-Nets (no scale_shift_norm / resblock_updown)")
    sizes = [image_size // 2 ** i for i in range(len(model.ch_mult))]
    down = tuple("AttnDownBlock2D" if s in model.attn_resolutions else "DownBlock2D" for s in sizes)
    up = tuple("AttnUpBlock2D" if s in model.attn_resolutions else "UpBlock2D" for s in reversed(sizes))
    return UNet2DModel(
        sample_size=image_size, in_channels=in_channels, out_channels=model.out_channels or in_channels,
        block_out_channels=tuple(model.ch * m for m in model.ch_mult), layers_per_block=model.num_res_blocks,
        down_block_types=down, up_block_types=up,
        attention_head_dim=None if model.num_heads == 1 else model.ch * model.ch_mult[0] // model.num_heads,
        norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=model.dropout)


class TorchTrainCall:
    """The peer of ddm's train step (K steps per call) on diffusers' UNet2DModel with the config's
    architecture, on random images in [-1, 1]: t ~ U[0, T), x_t = q_sample(x_0, t, eps), the model
    with the config's dropout active, the config's loss, backward, global-norm clipping at
    optim.grad_clip, Adam at optim.learning_rate and an EMA of the parameters at the first
    optim.ema_rates. The loss is L_simple (mse to eps), or for a learned-range variance IDDPM's
    L_hybrid as ddm.losses computes it: mse + 0.001 T L_t, L_t the KL to the true posterior with the
    mean detached (the discretized decoder at t = 0), in bits/dim. bfloat16 is autocast.
    ``first_call_s`` is the first call's time (allocation, kernel choice)."""

    def __init__(self, config_name, dtype_name, batch, k=1, use_compile=False, **model_overrides):
        import torch

        config, model, diffusion, image_shape = build(config_name, dtype_name, **model_overrides)
        if (config.diffusion.timestep_sampler != "uniform" or diffusion.mean_type != "eps"
                or (diffusion.loss_type, diffusion.var_type) not in (("mse", "fixed_large"), ("mse", "fixed_small"),
                                                                     ("hybrid", "learned_range"))):
            raise ValueError(f"TorchTrainCall: {config_name} is not an eps / uniform-t L_simple or L_hybrid "
                             "(learned_range) config")
        self.torch, self.k, self.hybrid = torch, k, diffusion.loss_type == "hybrid"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        self.model = diffusers_unet(model, image_shape[0], image_shape[-1]).to(self.device).train()
        self.params = list(self.model.parameters())
        self.num_params = sum(p.numel() for p in self.params)
        self.ema = [p.detach().clone() for p in self.params]
        self.ema_rate, self.grad_clip = float(config.optim.ema_rates[0]), float(config.optim.grad_clip)
        self.optimizer = torch.optim.Adam(self.params, lr=config.optim.learning_rate,
                                          betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps)
        self.forward = torch.compile(self.model) if use_compile else self.model
        self.bf16 = dtype_name == "bfloat16"
        self.T = diffusion.num_timesteps
        self.arrays = {name: torch.tensor(np.asarray(getattr(diffusion, name)), dtype=torch.float32, device=self.device)
                       for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                                    "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
                                    "posterior_log_variance_clipped", "log_betas")}
        self.x0 = torch.rand((batch, image_shape[-1]) + tuple(image_shape[:2]), device=self.device) * 2 - 1
        start = time.perf_counter()
        self()
        self.first_call_s = time.perf_counter() - start

    def vb_bpd(self, eps, v, x0, xt, t):
        """L_t in bits/dim per example for the learned-range variance v in [-1, 1] (ddm.losses.vb_terms_bpd)."""
        torch = self.torch
        a = lambda name: self.arrays[name][t].view(-1, 1, 1, 1)
        pred_x0 = a("sqrt_recip_alphas_cumprod") * xt - a("sqrt_recipm1_alphas_cumprod") * eps
        mean = a("posterior_mean_coef1") * pred_x0 + a("posterior_mean_coef2") * xt
        true_mean = a("posterior_mean_coef1") * x0 + a("posterior_mean_coef2") * xt
        min_log, max_log = a("posterior_log_variance_clipped"), a("log_betas")
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        kl = 0.5 * (-1 + log_var - min_log + torch.exp(min_log - log_var) + (true_mean - mean) ** 2 * torch.exp(-log_var))
        cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
        inv_std = torch.exp(-0.5 * log_var)
        cdf_plus, cdf_min = cdf(inv_std * (x0 - mean + 1 / 255)), cdf(inv_std * (x0 - mean - 1 / 255))
        log_probs = torch.where(x0 < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                                torch.where(x0 > 0.999, torch.log((1 - cdf_min).clamp(min=1e-12)),
                                            torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
        dims = (1, 2, 3)
        return torch.where(t == 0, -log_probs.mean(dims), kl.mean(dims)) / math.log(2)

    def step(self):
        torch, x0 = self.torch, self.x0
        t = torch.randint(0, self.T, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        xt = (self.arrays["sqrt_alphas_cumprod"][t].view(-1, 1, 1, 1) * x0
              + self.arrays["sqrt_one_minus_alphas_cumprod"][t].view(-1, 1, 1, 1) * noise)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.forward(xt, t).sample.float()
        eps, v = out[:, :x0.shape[1]], out[:, x0.shape[1]:]
        loss = torch.nn.functional.mse_loss(eps, noise)
        if self.hybrid:
            loss = loss + 0.001 * self.T * self.vb_bpd(eps.detach(), v, x0, xt, t).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_mul_(self.ema, self.ema_rate)
            torch._foreach_add_(self.ema, self.params, alpha=1.0 - self.ema_rate)

    def __call__(self):
        for _ in range(self.k):
            self.step()
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- #
# Timing.
# --------------------------------------------------------------------------------------------- #

def interleaved(runners, rounds: int):
    """Seconds of each call, per runner, over `rounds` rounds that alternate between the runners
    (so load from other processes falls on all of them). Returns a list of lists."""
    times = [[] for _ in runners]
    for _ in range(rounds):
        for i, run in enumerate(runners):
            start = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - start)
    return times


def median(values):
    return float(np.median(values))


def host_cpu(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The host CPU as /proc/cpuinfo names it, with its family, model and widest vector ISA (on 2
    cores the ratio to the peer moved with the CPU: a Zen 5's oneDNN convs beat XLA's, an earlier
    box's did not); "unknown CPU" where the file is missing."""
    try:
        with open(cpuinfo_path) as f:
            first = f.read().split("\n\n")[0]  # the first processor's block
    except OSError:
        return "unknown CPU"
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    flags = fields.get("flags", "").split()
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags),
               "no AVX")
    return (f"{fields.get('model name', '?')}, family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}, {isa}")


def machine_line():
    device = jax.devices()[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"device: {device.device_kind} x{jax.local_device_count()} ({device.platform}), jax {jax.__version__}, "
            f"{os.cpu_count()} CPU cores ({host_cpu()}), load average {load:.1f}")


# --------------------------------------------------------------------------------------------- #
# The train step and the sampling step of a config, compiled.
# --------------------------------------------------------------------------------------------- #

def random_params(model, image_shape, seed=0, scale=0.02):
    """Parameters of init's shapes drawn N(0, scale^2) (no zero-initialised branch; no init compile)."""
    x = jnp.zeros((1,) + tuple(image_shape))
    t = jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


class Lowered:
    """A lowered call (``self.lowered``) compiled on demand, with its compile time in seconds."""

    def compile(self, compiler_options=None):
        start = time.perf_counter()
        self.compiled = self.lowered.compile(compiler_options=compiler_options)
        self.compile_s = time.perf_counter() - start
        return self.compiled

    def ready(self, compiler_options=None):
        """Compiled (with XLA ``compiler_options``), real inputs on the devices, warmed up by one call."""
        self.compile(compiler_options)
        self.materialize()
        self()
        return self


class TrainCall(Lowered):
    """ddm's pmapped train call (K steps per call, as experiment.train runs it) on random images.

    ``lowered`` is lowered for (devices, K, batch / devices) inputs; ``compile()`` compiles it;
    ``__call__`` runs one call (after ``compile``). ``unroll`` and ``donate`` default to
    experiment.train's choice for the backend."""

    def __init__(self, config_name, dtype_name, batch, k=1, devices=None, unroll=None, donate=None, **model_overrides):
        from ddm import train
        from ddm.timestep_sampling import get_timestep_sampler

        config, model, diffusion, image_shape = build(config_name, dtype_name, **model_overrides)
        self.config, self.model, self.image_shape, self.k = config, model, image_shape, k
        sampler = get_timestep_sampler(config.diffusion.timestep_sampler, config.diffusion.num_timesteps)
        optimizer = experiment.build_optimizer(config)
        ema_rates = tuple(config.optim.ema_rates)
        devices = list(devices or jax.local_devices())
        if batch % len(devices):
            raise ValueError(f"batch {batch} must be a multiple of the {len(devices)} devices")
        state = jax.eval_shape(lambda: train.create_train_state(
            model, optimizer, sampler, jax.random.PRNGKey(0), image_shape, ema_rates))
        step_fn = train.make_train_step(model, diffusion, sampler, optimizer, ema_rates, DTYPES[dtype_name])
        choices = train.backend_choices(devices)  # as experiment.train
        self.unroll = choices["unroll"] if unroll is None else unroll
        self.multi = train.make_multi_step(step_fn, unroll=self.unroll,
                                           donate=choices["donate"] if donate is None else donate, devices=devices)
        shape = (len(devices), k, batch // len(devices))
        self.state_shapes = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct((len(devices),) + s.shape, s.dtype), state)
        self.batch_shapes = {"image": jax.ShapeDtypeStruct(shape + tuple(image_shape), jnp.float32),
                             "label": jax.ShapeDtypeStruct(shape, jnp.int32)}
        self.devices, self.batch = devices, batch
        self.lowered = self.multi.lower(self.state_shapes, self.batch_shapes)
        self.compiled = None

    def materialize(self):
        """Real (random) state and batch on the devices, for timing."""
        from ddm import train
        from ddm.timestep_sampling import get_timestep_sampler

        c = self.config
        sampler = get_timestep_sampler(c.diffusion.timestep_sampler, c.diffusion.num_timesteps)
        state = train.create_train_state(self.model, experiment.build_optimizer(c), sampler, jax.random.PRNGKey(0),
                                         self.image_shape, tuple(c.optim.ema_rates))
        state = state.replace(params=random_params(self.model, self.image_shape))
        self.state = train.replicate(state, self.devices)
        rng = np.random.default_rng(0)
        sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(self.devices), (train.AXIS,)),
                                              jax.sharding.PartitionSpec(train.AXIS))
        self.inputs = jax.device_put(
            {"image": rng.uniform(-1, 1, self.batch_shapes["image"].shape).astype(np.float32),
             "label": np.zeros(self.batch_shapes["label"].shape, np.int32)}, sharding)

    def flops_per_step(self) -> float:
        """Global FLOPs of one train step from the compiled call's cost analysis."""
        per_call = cost_flops(self.compiled or self.compile()) * len(self.devices)
        return per_call / self.k if self.unroll else per_call  # a scan's body is counted once

    def __call__(self):
        self.state, metrics = self.compiled(self.state, self.inputs)
        jax.block_until_ready((self.state, metrics))

    def pipelined_s(self, calls: int) -> float:
        """Seconds per call over ``calls`` calls made back to back and waited for once at the end, as
        experiment.train makes them (it reads a call's finite flag only after dispatching the next), so
        the host's dispatch of a call (per state leaf: 1316 leaves for DDPM CIFAR-10) overlaps the
        device's work on the one before."""
        start = time.perf_counter()
        for _ in range(calls):
            self.state, metrics = self.compiled(self.state, self.inputs)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / calls


class SampleCall(Lowered):
    """One sampling step of a config's sampler (config.sample.method over its respaced steps, or
    ``method``/``steps`` given): U-Net forward + the update, jitted, on a (batch, H, W, C) state."""

    def __init__(self, config_name, dtype_name, batch, method=None, steps=None, devices=None, **model_overrides):
        from ddm.sampling import ddim_step, ddpm_step

        config, model, diffusion, image_shape = build(config_name, dtype_name, **model_overrides)
        if method:
            config.sample.method = method
        if steps:
            config.sample.steps = steps
        self.method, self.steps = config.sample.method, config.sample.steps
        d = experiment.build_sampling_diffusion(config, diffusion)
        step = ddim_step if self.method == "ddim" else ddpm_step
        clip = config.sample.clip_denoised

        def fn(params, x, t, key):
            model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False).astype(jnp.float32)
            return step(d, model_fn, x, t, key, clip_denoised=clip)[0]

        self.devices = list(devices or jax.local_devices()[:1])
        n = len(self.devices)
        if batch % n:
            raise ValueError(f"batch {batch} must be a multiple of the {n} devices")
        # one device: jit, lowered for that device (a compile-only one too); several: pmap over
        # batch / n images each, parameters broadcast
        self.x_shape = (batch,) + tuple(image_shape) if n == 1 else (n, batch // n) + tuple(image_shape)
        self.fn = jax.jit(fn) if n == 1 else jax.pmap(fn, in_axes=(None, 0, None, None), devices=self.devices)
        self.model, self.image_shape, self.batch, self.diffusion = model, image_shape, batch, d
        sharding = jax.sharding.SingleDeviceSharding(self.devices[0]) if n == 1 else None
        on_device = lambda tree: jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)
        self.lowered = self.fn.lower(*on_device((
            jax.eval_shape(lambda: random_params(model, image_shape)), jax.ShapeDtypeStruct(self.x_shape, jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)))))
        self.compiled = None

    def materialize(self):
        self.params = random_params(self.model, self.image_shape)
        self.x = jax.random.normal(jax.random.key(1), self.x_shape)
        self.t = jnp.int32(self.diffusion.num_timesteps // 2)
        self.key = jax.random.key(2)

    def __call__(self):
        jax.block_until_ready(self.compiled(self.params, self.x, self.t, self.key))


class SampleScanCall(Lowered):
    """A whole DDIM sampler call as ddm samples: ``ddm.ddim_sample`` (eta 0, one lax.scan over
    ``steps`` respaced steps) on a batch of noise, jitted, with random parameters. Each call draws
    new noise (key = call count); ``__call__`` returns the images."""

    def __init__(self, config_name, dtype_name, batch, steps, **model_overrides):
        import ddm

        _, model, diffusion, image_shape = build(config_name, dtype_name, **model_overrides)
        d = ddm.respace(diffusion, ddm.space_timesteps(diffusion.num_timesteps, f"ddim{steps}"))

        def sample(params, key):
            model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False).astype(jnp.float32)
            return ddm.ddim_sample(d, model_fn, key, (batch,) + tuple(image_shape), eta=0.0)

        self.model, self.image_shape, self.batch, self.steps, self.diffusion = model, image_shape, batch, steps, d
        params = jax.eval_shape(lambda: random_params(model, image_shape))
        self.lowered = jax.jit(sample).lower(params, jax.eval_shape(lambda: jax.random.key(0)))
        self.compiled = None

    def materialize(self):
        self.params = random_params(self.model, self.image_shape)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return jax.block_until_ready(self.compiled(self.params, jax.random.key(self.calls)))


def cost_flops(compiled) -> float:
    """FLOPs of one call of a compiled executable from XLA's cost analysis (per device for pmap).

    XLA counts a while loop's body once (checked: a 3-step lax.scan train call reports one step's
    FLOPs), so a scanned K-step call reports one step; an unrolled one reports K steps."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


def peak_bytes(compiled) -> dict:
    """Bytes from the compiled executable's memory_analysis(): arguments, outputs, temporaries,
    aliased (donated) and peak = arguments + outputs + temporaries - aliased, per device."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {name: int(getattr(m, f"{name}_size_in_bytes", 0)) for name in ("argument", "output", "temp", "alias",
                                                                        "generated_code")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    peak_memory = getattr(m, "peak_memory_in_bytes", 0)
    if peak_memory:
        out["peak_reported"] = int(peak_memory)
    return out


# --------------------------------------------------------------------------------------------- #
# A candidate U-Net change measured by variant_ab.py (arm wgrad_taps), profile_steps.py and
# cpu_scan_unroll.py, kept here (not in ddm/unet.py) because it did not pay on balance: kernel
# gradients as matmuls.
# --------------------------------------------------------------------------------------------- #

def _weight_grad_by_taps(x, g, kernel_shape, strides, pads):
    """The kernel gradient of an NHWC x HWIO -> NHWC convolution as one (C_in, C_out) matmul per
    kernel tap: dK[i, j] = sum over (b, h, w) of x_padded[b, s*h + i, s*w + j, :]^T g[b, h, w, :].

    Same numbers as the convolution's own transpose (up to summation order). Measured on XLA:CPU:
    forward + both gradients of one 32x32x128 -> 128 layer (batch 8) 879 -> 652 ms; but see
    variant_ab.py / cpu_scan_unroll.py for the whole train step and the compile time.
    """
    kh, kw, c_in, c_out = kernel_shape
    sh, sw = strides
    b, ho, wo, _ = g.shape
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    g2 = g.reshape(b * ho * wo, c_out)
    taps = []
    for i in range(kh):
        for j in range(kw):
            xs = lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c_in),
                           (1, sh, sw, 1))
            taps.append(lax.dot_general(xs.reshape(b * ho * wo, c_in), g2, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32).astype(g.dtype))
    return jnp.stack(taps).reshape(kernel_shape)


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` for nn.Conv with the same forward and input gradient, whose
    kernel gradient on CPU is computed by `_weight_grad_by_taps` (accelerators keep XLA's own,
    through ``lax.platform_dependent``).

    Only for plain NHWC/HWIO convolutions (what nn.Conv builds here); anything else, e.g. dilation
    or feature groups, falls through to lax unchanged.
    """
    conv = functools.partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                             lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                             dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                             precision=precision, **kwargs)
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    dilated = any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
    if (lhs.ndim != 4 or feature_group_count != 1 or dilated or kwargs
            or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc):
        return conv(lhs, rhs)
    pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
            if isinstance(padding, str) else padding)

    @jax.custom_vjp
    def f(x, k):
        return conv(x, k)

    def f_fwd(x, k):
        return conv(x, k), (x, k)

    def f_bwd(res, g):
        x, k = res
        dx = jax.vjp(lambda x: conv(x, k), x)[1](g)[0]
        dk = lax.platform_dependent(
            x, g, cpu=lambda x, g: _weight_grad_by_taps(x, g, k.shape, window_strides, pads),
            default=lambda x, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])
        return dx, dk

    f.defvjp(f_fwd, f_bwd)
    return f(lhs, rhs)


def _conv_module_with(conv_general_dilated):
    """A stand-in for ``ddm.unet._conv`` that builds the same nn.Conv with its convolution replaced."""
    import ddm.unet as unet

    def conv(features, dtype, *, kernel=3, stride=1, zero=False, name=None):
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                       kernel_init=unet._kernel_init(zero), bias_init=nn.initializers.zeros, dtype=dtype,
                       param_dtype=jnp.float32, name=name, conv_general_dilated=conv_general_dilated)

    return _swapped(unet, "_conv", conv)


def kernel_grad_by_taps():
    """While active, ddm.unet builds its convolutions with `_conv_general_dilated` (kernel gradients
    as per-tap matmuls on CPU). Trace (lower) the step inside the block; the forward is unchanged."""
    return _conv_module_with(_conv_general_dilated)


def _winograd_input(x):
    """B^T d B for every 4x4 tile of x (B, H, W, C) padded by one pixel, at stride 2:
    (16, B * H/2 * W/2, C), the 16 indexing (row, column) of the transformed tile."""
    b, height, width, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    bt = lambda d0, d1, d2, d3: (d0 - d2, d1 + d2, d2 - d1, d1 - d3)  # B^T, along one axis
    rows = bt(*(xp[:, i:i + height:2] for i in range(4)))
    v = jnp.stack([jnp.stack(bt(*(r[:, :, j:j + width:2] for j in range(4)))) for r in rows])
    return v.reshape(16, b * (height // 2) * (width // 2), c)


def _winograd_kernel(kernel):
    """G g G^T of a (3, 3, C, F) kernel: (16, C, F), as plain sums of slices (no tiny-K matmuls)."""
    g = lambda k0, k1, k2: (k0, 0.5 * (k0 + k1 + k2), 0.5 * (k0 - k1 + k2), k2)  # G, along one axis
    rows = g(*(kernel[i] for i in range(3)))
    return jnp.stack([jnp.stack(g(*(r[j] for j in range(3)))) for r in rows]).reshape(16, *kernel.shape[2:])


def winograd_f2x2_conv3x3(x, kernel, dtype):
    """A 3x3 'SAME' stride-1 conv of x (B, H, W, C), H and W even, with a (3, 3, C, F) kernel (no
    bias), as Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016): (B, H, W, F) in ``dtype``.

    Each 2x2 output tile is A^T [(G g G^T) * (B^T d B)] A of the 4x4 input tile d around it: one
    (C, F) matmul per transformed tap, 16 multiply-adds per 4 output pixels and channel pair where
    the direct conv has 36. Autodiff gives both gradients in the same transformed form. The
    transforms and the matmuls' sums are float32 and only the transformed tiles and kernel are
    rounded to ``dtype``: in bfloat16 the output transform's cancelling sums otherwise lose the
    small outputs (measured: 0.18 came out 0).
    """
    b, height, width, _ = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"winograd_f2x2_conv3x3: H={height} and W={width} must be even")
    u = _winograd_kernel(kernel.astype(jnp.float32)).astype(dtype)
    v = _winograd_input(x.astype(jnp.float32)).astype(dtype)
    m = jnp.einsum("tpc,tcf->tpf", v, u, preferred_element_type=jnp.float32)
    m = m.reshape(4, 4, b, height // 2, width // 2, -1)
    at = lambda m0, m1, m2, m3: (m0 + m1 + m2, m1 - m2 - m3)  # A^T, along one axis
    y = [at(*(r[j] for j in range(4))) for r in at(*(m[i] for i in range(4)))]  # y[row parity][column parity]
    y = jnp.stack([jnp.stack(r, axis=3) for r in y], axis=2)  # (B, H/2, 2, W/2, 2, F)
    return y.reshape(b, height, width, -1).astype(dtype)


WINOGRAD_MAX_SIZE = 16  # the largest H, W the winograd arm transforms; 32x32 was slower per layer


def _winograd_conv_general_dilated(x, kernel, window_strides, padding, **kwargs):
    """nn.Conv's ``lax.conv_general_dilated`` with the stride-1 3x3 'SAME' convs of even H, W at
    most WINOGRAD_MAX_SIZE as ``winograd_f2x2_conv3x3`` on CPU (through ``lax.platform_dependent``;
    XLA's own elsewhere and for every other conv)."""
    direct = lambda x, k: lax.conv_general_dilated(x, k, window_strides, padding, **kwargs)
    height, width = x.shape[1:3]
    if (padding != "SAME" or kernel.shape[:2] != (3, 3) or tuple(window_strides) != (1, 1)
            or kwargs.get("feature_group_count", 1) != 1 or height % 2 or width % 2
            or max(height, width) > WINOGRAD_MAX_SIZE):
        return direct(x, kernel)
    return lax.platform_dependent(x, kernel, cpu=lambda x, k: winograd_f2x2_conv3x3(x, k, x.dtype), default=direct)


def winograd_small_convs():
    """While active, ddm.unet runs its stride-1 3x3 convs of at most 16x16 as Winograd F(2x2, 3x3)
    on CPU (``winograd_f2x2_conv3x3``; measured and not adopted). Trace (lower) the step inside the block."""
    return _conv_module_with(_winograd_conv_general_dilated)


def flax_group_norm():
    """While active, ddm.unet builds flax's ``nn.GroupNorm`` (autodiff gradient, moments over each
    group's (H, W, C / G) block) in place of ddm's GroupNorm. Trace (lower) the step inside the block."""
    import ddm.unet as unet

    def group_norm(dtype=jnp.float32, name=None):
        return nn.GroupNorm(num_groups=unet.NUM_GROUPS, epsilon=unet.NORM_EPS, dtype=dtype,
                            param_dtype=jnp.float32, name=name)

    return _swapped(unet, "GroupNorm", group_norm)


def nearest_upsample_conv():
    """While active, ddm.unet's upsampling convs run as DDPM and diffusers write them: a 3x3 conv
    over the nearest-neighbour upsampled image (2H x 2W), in place of ``upsample_conv``'s four 2x2
    sub-pixel convs over the input. Trace (lower) the step inside the block."""
    import ddm.unet as unet

    def upsample_then_conv(x, kernel, dtype):
        return lax.conv_general_dilated(unet._upsample_nearest(x).astype(dtype), kernel.astype(dtype), (1, 1),
                                        "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    return _swapped(unet, "upsample_conv", upsample_then_conv)


def _dropout_on_its_own_rng(make):
    """A stand-in for ddm.unet.Dropout that leaves the U-Net's seed and stream aside and runs
    ``make(rate, deterministic)``, a dropout module that draws from the 'dropout' rng itself."""

    class DropoutOnItsOwnRng(nn.Module):
        rate: float
        deterministic: bool

        @nn.compact
        def __call__(self, x, seed=None, stream=0):
            return make(self.rate, self.deterministic)(x)

    return DropoutOnItsOwnRng


def threefry_dropout():
    """While active, ddm.unet's res blocks use flax's ``nn.Dropout`` (a ``jax.random.bernoulli`` mask,
    threefry bits) in place of ``unet.Dropout`` (hashed-index mask). Trace (lower) the step inside the block."""
    import ddm.unet as unet

    return _swapped(unet, "Dropout", _dropout_on_its_own_rng(lambda rate, det: nn.Dropout(rate, deterministic=det)))


def rng_per_dropout():
    """While active, each of ddm.unet's dropout layers draws its mask's seed from flax's 'dropout'
    rng itself (a threefry fold_in and a draw per layer), as before the U-Net drew one seed for all
    and each layer hashed it with its block's name (``ddm.unet.Dropout``). Trace (lower) the step
    inside the block."""
    import ddm.unet as unet

    dropout = unet.Dropout
    return _swapped(unet, "Dropout", _dropout_on_its_own_rng(lambda rate, det: dropout(rate, det)))


def einsum_heads():
    """While active, ddm.unet's attention keeps the heads as an einsum axis ("bqnd,bknd->bnqk"), as it
    did before ``unet.multi_head_attention`` moved them into the batch axis. Trace (lower) the step inside
    the block."""
    import ddm.unet as unet

    def attention(q, k, v, num_heads, implementation):  # XLA's, as ddm's default
        b, height, width, c = q.shape
        q, k, v = (a.reshape(b, height * width, num_heads, c // num_heads) for a in (q, k, v))
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k) * (c // num_heads) ** -0.5
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("bnqk,bknd->bqnd", weights, v).reshape(b, height, width, c)

    return _swapped(unet, "multi_head_attention", attention)


def cudnn_attention():
    """While active, ddm.unet's attention blocks use cuDNN's fused attention (``UNet(attention="cudnn")``,
    ``model.attention``) in place of the default "xla" products and softmax: NVIDIA GPUs and bfloat16
    only. Compiled for an H100 (``gpu_hlo.py``), the DDPM train step moves 1.01 GB less per step (41
    kernels fewer); its speed needs a GPU to time. Trace (lower) the step inside the block."""
    import ddm.unet as unet

    attention = unet.multi_head_attention
    return _swapped(unet, "multi_head_attention",
                    lambda q, k, v, num_heads, implementation: attention(q, k, v, num_heads, "cudnn"))


def direct_convs():
    """While active, ddm.unet runs every conv as XLA's direct convolution (``lax.conv_general_dilated``),
    in place of ``unet._conv_general_dilated``'s Winograd F(4, 3) for the 3x3 stride-1 convs on CPU.
    Trace (lower) the step inside the block."""
    import ddm.unet as unet

    return _swapped(unet, "_conv_general_dilated", lax.conv_general_dilated)


def optax_clip():
    """While active, ddm.train.make_optimizer clips with ``optax.clip_by_global_norm`` (a select and a
    divide per element, materialised) in place of ``train.clip_by_global_norm`` (a multiply by one
    scalar, fused into Adam). Build the optimizer and trace the step inside the block."""
    from ddm import train

    return _swapped(train, "clip_by_global_norm", optax.clip_by_global_norm)


def dense_4d():
    """While active, ddm.unet's dense layers contract (B, H, W, C) inputs with ``lax.dot_general`` as
    nn.Dense does by default, in place of ``unet._matmul_last_axis``'s one 2-D matmul of the flattened
    input. Trace (lower) the step inside the block."""
    import ddm.unet as unet

    return _swapped(unet, "_matmul_last_axis", lax.dot_general)


class ConcatNinShortcut(NinShortcut):
    """ddm.unet.NinShortcut (same parameters) as one matmul of the parts concatenated."""

    @nn.compact
    def __call__(self, parts):
        return NinShortcut.__call__(self, (jnp.concatenate(parts, axis=-1),))


def concat_skip():
    """While active, the up path's NIN shortcuts are one matmul of the block's input and the skip
    connection concatenated (as before ``ddm.unet.NinShortcut``'s one matmul per part), so XLA
    writes the concatenation out. Same parameters. Trace (lower) the step inside the block."""
    import ddm.unet as unet

    return _swapped(unet, "NinShortcut", ConcatNinShortcut)


def folded_norm_grads():
    """While active, ddm.unet's GroupNorm gradient lets XLA fold its scale and bias gradients (sums
    of the (B, C) sums) into reductions of the whole tensors on every device, as before
    ``ddm.unet._scale_bias_grads`` (which keeps the folding on CPU only). Trace (lower) the step
    inside the block."""
    import ddm.unet as unet

    return _swapped(unet, "_scale_bias_grads", unet._batch_sums)


@contextlib.contextmanager
def reduced_group_sums():
    """While active, ddm.unet's GroupNorm sums its groups' channels with a reduction on every device
    and size, in place of ``ddm.unet._group_sums``' adds of strided slices on GPUs, and sums its scale
    and bias gradients over the batch as two reductions (through the same barrier), in place of
    ``ddm.unet._stacked_batch_sums``' one: as before both. Trace (lower) the step inside the block."""
    import ddm.unet as unet

    batch_sums, sum_by_reduction = unet._batch_sums, unet._sum_by_reduction
    two_reductions = lambda dy_xhat, dy_sum: batch_sums(*jax.lax.optimization_barrier((dy_xhat, dy_sum)))
    reduced = lambda v, num_groups, positions: sum_by_reduction(v.reshape(v.shape[0], num_groups, -1))
    with _swapped(unet, "_group_sums", reduced), _swapped(unet, "_stacked_batch_sums", two_reductions):
        yield


def _raveled_norm(tree, *args, **kwargs):
    """The L2 norm of all of ``tree``'s leaves as one concatenated vector: one concatenation and one
    reduction, where optax.tree.norm reduces each leaf on its own."""
    del args, kwargs
    return jnp.sqrt(jnp.sum(jnp.square(ravel_pytree(tree)[0])))


def flat_norm():
    """While active, the gradients' global norm (ddm.train's clip and its grad_norm metric, both
    through ``ddm.train.global_norm``) is one reduction over all the gradients concatenated, in place
    of one for the small leaves and one per larger leaf: a GPU candidate. Compiled for an H100
    (``gpu_hlo.py``), the DDPM train step then has 42 fewer kernels, for 0.37 GB more read and
    written; against the per-leaf norms it replaced it ran 1.03x slower on 2 CPU cores (float32,
    batch 8, 4 steps per call). Trace (lower) the step inside the block."""
    from ddm import train

    return _swapped(train, "global_norm", _raveled_norm)


def leaf_norms():
    """While active, the gradients' global norm (ddm.train's clip and its grad_norm metric) is
    ``optax.tree.norm``'s, one reduction per leaf, in place of ``ddm.train.global_norm``'s one for
    all the small leaves concatenated. Trace (lower) the step inside the block."""
    from ddm import train

    return _swapped(train, "global_norm", optax.tree.norm)


@contextlib.contextmanager
def flat_optimizer():
    """While active, the optimizer ddm.experiment builds runs on the gradients concatenated into one
    vector (``optax.flatten`` around the clip and Adam, whose moments are then flat vectors too), and
    the grad_norm metric is one reduction as well (``flat_norm``): a GPU candidate. Compiled for an
    H100 (``gpu_hlo.py``), the DDPM train step has 309 fewer kernels per step, for 0.48 GB more read
    and written; on 2 CPU cores the same change ran 1.14x slower (float32, batch 8). Build the
    optimizer and trace the step inside the block."""
    from ddm import experiment

    make = experiment.make_optimizer
    with _swapped(experiment, "make_optimizer", lambda *args, **kwargs: optax.flatten(make(*args, **kwargs))):
        with flat_norm():
            yield


def _tanh_swish(x):
    return x * (0.5 + 0.5 * jnp.tanh(0.5 * x))


def tanh_swish():
    """While active, the swish activations ddm.unet applies are x (1 + tanh(x / 2)) / 2, the same
    function (within 2.1e-6 of ``nn.swish`` and its gradient over [-30, 30]), where XLA:CPU computes
    tanh as a rational function instead of the sigmoid's exp and divide. No gain on 2 CPU cores (Zen
    4): see PERFORMANCE.md. Trace (lower) the step inside the block."""
    import ddm.unet as unet

    return _swapped(unet.nn, "swish", _tanh_swish)


# --------------------------------------------------------------------------------------------- #
# Ablations: ddm with one piece taken out (not the same model), so that ddm's time minus the
# ablation's is what the piece costs in a whole step: attributed on any device, where a profile's
# per-op times are not (on 2 CPU cores the trace timed a 4.7 MB kernel transpose at 10 ms, which
# takes 0.14 ms alone).
# --------------------------------------------------------------------------------------------- #

def _passthrough(*args, **kwargs):
    """A stand-in for a module class: the 'module' it builds returns its (first) input."""
    return lambda x, *args, **kwargs: x


def without_attention():
    """While active, ddm.unet's attention blocks return their input (norm, q/k/v, softmax, output
    projection and residual add all gone). An ablation. Trace (lower) the step inside the block."""
    import ddm.unet as unet

    return _swapped(unet, "AttnBlock", _passthrough)


def without_group_norm():
    """While active, ddm.unet's GroupNorms are their affine part alone, x * scale + bias (no
    moments, no normalisation; the same parameters). An ablation. Trace (lower) the step inside the
    block."""
    import ddm.unet as unet

    return _swapped(unet, "group_norm", lambda x, scale, bias, num_groups, eps: x * scale + bias)


def without_swish():
    """While active, the swish activations ddm.unet applies (``nn.swish``) are the identity. An
    ablation. Trace (lower) the step inside the block."""
    import ddm.unet as unet

    return _swapped(unet.nn, "swish", lambda x: x)


def without_dropout():
    """While active, ddm.unet's dropout layers return their input in training too. An ablation.
    Trace (lower) the step inside the block."""
    import ddm.unet as unet

    return _swapped(unet, "Dropout", _passthrough)


def without_ema():
    """While active, ddm.train's step keeps the EMA parameters as they are (no EMA update: two
    reads and a write of every parameter less). An ablation. Trace (lower) the step inside the block."""
    from ddm import train

    return _swapped(train, "update_ema", lambda ema_params, params, ema_rates: ema_params)


# The ablations an arm can name: ddm's time minus the arm's is what the removed piece costs.
ABLATIONS = {"without_attention": without_attention, "without_group_norm": without_group_norm,
             "without_swish": without_swish, "without_dropout": without_dropout, "without_ema": without_ema}

# The variants a benchmark arm can name (variant_ab.py), each a context manager to trace inside.
VARIANTS = {"ddm": contextlib.nullcontext, "flax_group_norm": flax_group_norm,
            "nearest_upsample": nearest_upsample_conv, "wgrad_taps": kernel_grad_by_taps,
            "winograd_2d": winograd_small_convs, "threefry_dropout": threefry_dropout,
            "einsum_heads": einsum_heads, "direct_convs": direct_convs, "optax_clip": optax_clip,
            "dense_4d": dense_4d, "flat_norm": flat_norm, "concat_skip": concat_skip,
            "folded_norm_grads": folded_norm_grads, "flat_optimizer": flat_optimizer,
            "leaf_norms": leaf_norms, "cudnn_attention": cudnn_attention,
            "reduced_group_sums": reduced_group_sums, "rng_per_dropout": rng_per_dropout,
            "tanh_swish": tanh_swish, **ABLATIONS}


@contextlib.contextmanager
def _swapped(module, name, value):
    """``module.name`` set to ``value`` inside the block, restored after it."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)
