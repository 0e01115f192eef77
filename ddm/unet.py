"""The DDPM U-Net (Ho et al. 2020) with the options of improved DDPM, as a `flax.linen` module.

The network maps a noisy image batch and its timestep indices to an image-shaped output; it knows
nothing of diffusion (what the output means is the diffusion's business).

    model = UNet(ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.1)
    variables = model.init({"params": key}, x, t, train=False)
    out = model.apply(variables, x, t, train=True, rngs={"dropout": key})

Layout and initialisation follow DDPM's TensorFlow code (`diffusion_tf/models/unet.py`): every
kernel is variance-scaling (scale 1, fan_avg, uniform), every bias zero, and the last layer of each
branch that is added to a residual stream -- the second conv of each res block, the attention
output projection and the output conv -- starts at zero (DDPM's `init_scale=0.`, improved
diffusion's `zero_module`). The options of improved-diffusion / guided-diffusion (Nichol &
Dhariwal 2021; Dhariwal & Nichol 2021) are off by default.

Paper references used below:
  DDPM  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models".
  IDDPM Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models".
  ADM   Dhariwal, Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis".
"""
import functools
import math
import zlib
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_GROUPS = 32  # GroupNorm groups, as DDPM and IDDPM.
NORM_EPS = 1e-6  # tf.contrib.layers.group_norm's epsilon, which DDPM used.


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """DDPM's sinusoidal timestep embedding (the Transformer's, as in tensor2tensor).

    Args:
      t: (B,) integer (or float) timestep indices.
      dim: embedding size, even and at least 4.
      max_period: the longest period, 10000 as in DDPM.

    Returns:
      (B, dim) float32: [sin(t * f_i) for i < dim/2 | cos(t * f_i) for i < dim/2], with
      f_i = exp(-log(max_period) * i / (dim/2 - 1)), so f_0 = 1 and f_{dim/2-1} = 1/max_period.
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"timestep_embedding: dim={dim} must be even and at least 4")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _kernel_init(zero: bool):
    """DDPM's `default_init(scale=1)`, or zeros for the layers DDPM starts at `init_scale=0`."""
    if zero:
        return nn.initializers.zeros
    return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


# Winograd's minimal filtering F(4, 3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural
# Networks"), interpolation points 0, 1, -1, 2, -2 and infinity: 4 outputs of a 3-tap filter from 6
# products, y = A^T [(G g) * (B^T d)] for a 6-sample input tile d.
WINOGRAD_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
               (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
WINOGRAD_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
              (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
WINOGRAD_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
WINOGRAD_MIN_WIDTH = 16  # narrower images keep XLA's conv: with the 8x8 ones too, the sampling step was 0.97x


_NHWC = ("NHWC", "HWIO", "NHWC")  # the convs' dimension numbers: images NHWC, kernels HWIO


def _linear_combination(coefficients, terms):
    """sum_i c_i * terms_i, with no term for c_i = 0 and no multiply for c_i = +-1."""
    total = None
    for c, term in zip(coefficients, terms):
        if c == 0:
            continue
        term = term if c == 1 else -term if c == -1 else c * term
        total = term if total is None else total + term
    return total


def _pad_columns(x):
    """x (B, H, W, C) with one zero column each side: a 3x3 'SAME' conv's padding along W."""
    return jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))


def _winograd_padded(xp, kernel):
    """``winograd_conv3x3``'s value, by Winograd (see there), of an input already ``_pad_columns``."""
    batch, height, width, _ = xp.shape
    width -= 2
    if width % 4 or kernel.shape[:2] != (3, 3):
        raise ValueError(f"winograd_conv3x3: needs W (here {width}) a multiple of 4 and a 3x3 kernel "
                         f"(here {kernel.shape[:2]}); use jax.lax.conv_general_dilated for others")
    tiles = width // 4
    d = [xp[:, :, t:t + 4 * (tiles - 1) + 1:4] for t in range(6)]  # sample t of every tile: (B, H, W/4, C)
    g = [kernel[:, j] for j in range(3)]  # the kernel's columns, (3, C, F) each
    m = [jax.lax.conv_general_dilated(_linear_combination(bt, d), _linear_combination(gr, g)[:, None],
                                      (1, 1), ((1, 1), (0, 0)), dimension_numbers=_NHWC)
         for bt, gr in zip(WINOGRAD_BT, WINOGRAD_G)]  # 6 convs of 3x1 over H
    y = jnp.stack([_linear_combination(at, m) for at in WINOGRAD_AT], axis=3)  # (B, H, W/4, 4, F)
    return y.reshape(batch, height, width, -1)


@jax.custom_vjp
def winograd_conv3x3(x, kernel):
    """A 3x3 'SAME' stride-1 conv of x (B, H, W, C), W a multiple of 4, with a (3, 3, C, F) kernel
    (no bias): (B, H, W, F), as Winograd's F(4, 3) along W.

    Each row of 4 output pixels is A^T [(G g) * (B^T d)] of the 6 input columns d around it, per
    kernel row: 6 convs of a 3x1 kernel (over H) on the transformed columns, one per product, so
    18 multiply-adds per 4 output pixels and channel pair where the direct conv has 36. The
    transforms are sums of strided slices. Float32 error is about 2e-6 of the output's scale (XLA's
    direct conv: about 5e-7).

    Differentiated (a train step), the input gradient is Winograd's too: it is itself a stride-1
    'SAME' 3x3 conv, of the output gradient with the kernel turned 180 degrees and its channel axes
    swapped. The kernel gradient is XLA's direct conv's. On 2 CPU cores (2026-11-28, K=4 train calls)
    the Winograd forward made the train step 1.02x and 1.03x (DDPM) and 1.05x (IDDPM) faster than
    direct convs throughout, and the Winograd input gradient 1.03x and 1.02x (DDPM) and 1.03x (IDDPM)
    faster again, for 0.04 GiB more peak memory; sampling is 1.16x to 1.21x faster
    (benchmarks/variant_ab.py --arms ddm,direct_convs).
    """
    return _winograd_padded(_pad_columns(x), kernel)


def _winograd_fwd(x, kernel):
    # The padded input is the residual: XLA:CPU then writes the conv's input once, padded, where it
    # wrote it plain (for the kernel gradient) and padded (for the transforms): train step 1.03x
    # (DDPM) and 1.045x (IDDPM) faster.
    xp = _pad_columns(x)
    return _winograd_padded(xp, kernel), (xp, kernel)


def _winograd_bwd(residuals, g):
    xp, kernel = residuals
    dx = _winograd_padded(_pad_columns(g), jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
    valid_w = lambda k: jax.lax.conv_general_dilated(xp, k, (1, 1), ((1, 1), (0, 0)), dimension_numbers=_NHWC)
    return dx, jax.vjp(valid_w, kernel)[1](g)[0]


winograd_conv3x3.defvjp(_winograd_fwd, _winograd_bwd)


def _conv_general_dilated(x, kernel, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` as nn.Conv calls it, with the float32 stride-1 3x3 'SAME' convs
    of images at least WINOGRAD_MIN_WIDTH wide (a multiple of 4) run as ``winograd_conv3x3`` on CPU
    (the forward and the input gradient; the kernel gradient is the direct conv's), where XLA's direct
    conv is matmul-bound and Winograd halves its multiply-adds (through ``lax.platform_dependent``:
    accelerators, and every other conv, keep XLA's own)."""
    direct = functools.partial(jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                               lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                               dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                               precision=precision, **kwargs)
    if x.ndim != 4 or kernel.shape[:2] != (3, 3):
        return direct(x, kernel)
    nhwc = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _NHWC)
    if (tuple(window_strides) != (1, 1) or padding != "SAME" or feature_group_count != 1 or kwargs
            or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
            or jax.lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers) != nhwc
            or x.dtype != jnp.float32 or kernel.dtype != jnp.float32
            or x.shape[2] % 4 or x.shape[2] < WINOGRAD_MIN_WIDTH):
        return direct(x, kernel)
    return jax.lax.platform_dependent(x, kernel, cpu=winograd_conv3x3, default=direct)


def _conv(features: int, dtype, *, kernel: int = 3, stride: int = 1, zero: bool = False,
          name: Optional[str] = None):
    """A kxk 'SAME' conv (TF padding, so a stride-2 conv pads one pixel right and bottom); on CPU the
    float32 3x3 stride-1 ones run as Winograd F(4, 3), forward and input gradient (``_conv_general_dilated``)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                   kernel_init=_kernel_init(zero), bias_init=nn.initializers.zeros,
                   dtype=dtype, param_dtype=jnp.float32, name=name, conv_general_dilated=_conv_general_dilated)


def _matmul_last_axis(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` as nn.Dense calls it (x's last axis against the kernel's first), computed
    as one 2-D matmul of x flattened to (N, C): (..., C) x (C, F) -> (..., F).

    The same product, but its kernel gradient is then the 2-D x^T dy on the one materialised dy. Of
    the 4-D contraction over (B, H, W), XLA:CPU makes a transposed (F, B·H·W) copy of dy and fuses
    dy's producer (the next GroupNorm's backward) into it, recomputed at strided reads: the top items
    of the DDPM train step's profile at batch 32. Without them the train step ran 1.047x (batch 8)
    and 1.021x (batch 32) faster on 2 CPU cores (``benchmarks/variant_ab.py --arms ddm,dense_4d``).
    """
    if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or kernel.ndim != 2:
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), kernel, (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type)
    return y.reshape(x.shape[:-1] + kernel.shape[1:])


def _dense(features: int, dtype, *, zero: bool = False, name: Optional[str] = None):
    """A dense layer on the last axis; on (B, H, W, C) it is DDPM's NIN, a 1x1 conv (as one 2-D matmul,
    ``_matmul_last_axis``)."""
    return nn.Dense(features, kernel_init=_kernel_init(zero), bias_init=nn.initializers.zeros,
                    dtype=dtype, param_dtype=jnp.float32, name=name, dot_general=_matmul_last_axis)


# XLA:GPU sums fewer positions than this (a warp) inside the loop fusion that uses the sums.
ELEMENTAL_REDUCTION_SIZE = 32


def _group_sums(v, num_groups: int, positions: int):
    """(B, C) -> (B, G): each example's sums of v over each group's C / G channels, where v holds
    per-channel sums over ``positions`` = H * W feature-map positions.

    On NVIDIA GPUs, from 32 positions on, as C / G - 1 adds of strided slices rather than a
    reduction: XLA fuses the adds into the kernels around them, where a reduction is a kernel of its
    own. With ``_stacked_batch_sums`` below, compiled for an H100 (bfloat16, ``benchmarks/gpu_hlo.py
    --arms ddm,reduced_group_sums``), the DDPM train step at batch 128 has 199 fewer kernels per step
    (1748 instead of 1947) and the DDIM step at batch 2000 68 fewer (562 instead of 630); IDDPM's 275
    and 96 fewer; the bytes are the same. Under 32 positions (the 4x4 maps) XLA:GPU sums the positions
    inside the fusion that uses the sums (a reduction that small is no kernel of its own), and the
    adds split that fusion up: 8 kernels instead of 2 per GroupNorm in the DDIM step at batch 2000.
    On 2 CPU cores XLA:CPU fused the adds into the elementwise kernels, recomputed per element: the
    train step was 1.22x slower and the sampling step 1.30x (float32, batch 8). So other platforms
    reduce (TPUs, where the same could happen, untimed).
    """
    g = v.reshape(v.shape[0], num_groups, -1)
    if positions < ELEMENTAL_REDUCTION_SIZE:
        return _sum_by_reduction(g)
    return jax.lax.platform_dependent(g, cuda=_sum_by_adds, default=_sum_by_reduction)


def _sum_by_reduction(g):
    return jnp.sum(g, axis=-1)


def _sum_by_adds(g):
    """The sum over g's last axis as adds of its slices, in order."""
    return functools.reduce(jnp.add, [g[..., i] for i in range(g.shape[-1])])


def _group_moments(x, num_groups: int, eps: float):
    """Mean and 1 / std of x (B, H, W, C) over each example's channel groups, as (B, 1, 1, C).

    The moments are reduced over (H, W) first, then over each group's C / G channels
    (``_group_sums``): XLA:CPU reduces the leading spatial axes several times faster than
    (H, W, C / G) blocks. The variance is E[x^2] - E[x]^2 clipped at 0 (flax's and PyTorch's fast
    variance).
    """
    b, height, width, c = x.shape
    per_group = lambda m: _group_sums(m, num_groups, height * width) / (c // num_groups)
    mean = per_group(jnp.mean(x, axis=(1, 2)))
    var = jnp.maximum(per_group(jnp.mean(jnp.square(x), axis=(1, 2))) - jnp.square(mean), 0.0)
    per_channel = lambda g: jnp.repeat(g, c // num_groups, axis=1)[:, None, None, :]
    return per_channel(mean), per_channel(jax.lax.rsqrt(var + eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x, scale, bias, num_groups: int, eps: float):
    """GroupNorm of x (B, H, W, C) with per-channel scale and bias (C,) (Wu & He 2018).

    The gradient is the closed form (one pass for the per-(example, channel) sums, one for dx)
    instead of autodiff's chain through the moments; tests check it against flax's GroupNorm.
    """
    return _group_norm_fwd(x, scale, bias, num_groups, eps)[0]


def _group_norm_fwd(x, scale, bias, num_groups, eps):
    mean, inv_std = _group_moments(x, num_groups, eps)
    return (x - mean) * (inv_std * scale) + bias, (x, scale, mean, inv_std)


def _stacked_batch_sums(dy_xhat, dy_sum):
    """The (C,) sums over the batch of two (B, C) arrays, through an optimisation barrier, as one
    reduction of the two stacked (one kernel where XLA:GPU made two)."""
    sums = jnp.sum(jnp.stack(jax.lax.optimization_barrier((dy_xhat, dy_sum))), axis=1)
    return sums[0], sums[1]


def _scale_bias_grads(dy_xhat, dy_sum):
    """GroupNorm's scale and bias gradients (C,): its (B, C) sums of dy * xhat and dy summed over
    the batch, off CPU as ``_stacked_batch_sums``.

    XLA folds such a reduce of a reduce into one reduction of the whole (B, H, W, C) tensors, a
    second pass over x and dy (on CPU also a materialised dy * xhat). With the barrier, the DDPM
    train step compiled for an H100 reads and writes 0.69 GB less per step (of 28.1 GB) in 12 fewer
    kernels, IDDPM's 0.89 GB less (``benchmarks/gpu_hlo.py --arms ddm,folded_norm_grads``). On 2 CPU
    cores the train step ran at 1.00x and 0.98x of the folded form in two runs (per round 0.995x,
    0.986x; float32, batch 8, ``benchmarks/variant_ab.py --arms ddm,folded_norm_grads``), so CPU
    keeps XLA's folding (``lax.platform_dependent``).
    """
    return jax.lax.platform_dependent(dy_xhat, dy_sum, cpu=_batch_sums, default=_stacked_batch_sums)


def _batch_sums(dy_xhat, dy_sum):
    """The (C,) sums over the batch of two (B, C) arrays, each its own reduction."""
    return jnp.sum(dy_xhat, axis=0), jnp.sum(dy_sum, axis=0)


def _group_norm_bwd(num_groups, eps, residuals, dy):
    # With xhat = (x - mean) * inv_std and n = H * W * C / G elements per group:
    # dx = inv_std * (dy * scale - mean_g(dy * scale) - xhat * mean_g(dy * scale * xhat)).
    x, scale, mean, inv_std = residuals
    b, height, width, c = x.shape
    xhat = (x - mean) * inv_std
    dy_xhat, dy_sum = jnp.sum(dy * xhat, axis=(1, 2)), jnp.sum(dy, axis=(1, 2))  # (B, C)
    n = height * width * (c // num_groups)
    group_mean = lambda v: jnp.repeat(_group_sums(v * scale, num_groups, height * width) / n,
                                      c // num_groups, axis=1)[:, None, None, :]
    dx = inv_std * (dy * scale - group_mean(dy_sum) - xhat * group_mean(dy_xhat))
    return (dx,) + _scale_bias_grads(dy_xhat, dy_sum)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """GroupNorm(32, eps 1e-6) with parameters ``scale`` and ``bias`` (C,) like flax's
    ``nn.GroupNorm``; it normalises in float32 and returns ``dtype``."""
    num_groups: int = NUM_GROUPS
    epsilon: float = NORM_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm(x.astype(jnp.float32), scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def _mix32(x):
    """lowbias32 (C. Wellons' hash-prospector): a bijection of uint32 whose output bits each flip
    with probability ~1/2 when any input bit flips (bias 0.17 on that measure)."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_mask(key, shape, keep_prob: float):
    """A boolean mask of ``shape`` whose elements are True with probability ``keep_prob``.

    Each element is the hash of its flat index under a 64-bit seed drawn from ``key``:
    mix32(mix32(index ^ s0) ^ s1) < keep_prob * 2^32. Dropout needs cheap, well-mixed bits, not
    threefry's cryptographic strength: with these masks in its 22 dropout layers (8.7M elements
    at batch 8) the DDPM CIFAR-10 train step ran 1.06x faster on 2 CPU cores than with
    ``jax.random.bernoulli``'s (``benchmarks/variant_ab.py --arms ddm,threefry_dropout``).
    Within one mask the bits are distinct (a bijection of the index); masks under two keys are
    independent to the tests' resolution (``tests/test_unet.py``).
    """
    return seeded_keep_mask(jax.random.bits(key, (2,), jnp.uint32), shape, keep_prob)


def seeded_keep_mask(seed, shape, keep_prob: float):
    """``dropout_keep_mask``'s mask from its 64-bit seed, ``seed`` (2,) uint32."""
    size = math.prod(shape)
    if size > 2 ** 32:
        raise ValueError(f"dropout_keep_mask: {size} elements; the flat index is 32-bit (at most 2**32)")
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    threshold = jnp.uint32(min(round(keep_prob * 2.0 ** 32), 2 ** 32 - 1))
    return _mix32(_mix32(index ^ seed[0]) ^ seed[1]) < threshold


class Dropout(nn.Module):
    """Inverted dropout, as flax's ``nn.Dropout(rate)``: while not ``deterministic``, each element
    is zeroed with probability ``rate`` and the rest are scaled by 1 / (1 - rate).

    The mask is ``dropout_keep_mask``'s under the 'dropout' rng or, given ``seed`` ((2,) uint32, one
    for all the layers of a network), ``seeded_keep_mask``'s under the seed's words hashed with
    ``stream``, an int that tells this layer from the others (``_mix32(seed ^ stream)``). The U-Net
    draws one seed per call and passes it: flax's rng per layer is a threefry ``fold_in`` and a
    draw, two or three kernels of their own each, where the hash fuses into the mask's. Compiled for
    an H100 (``benchmarks/gpu_hlo.py --arms ddm,rng_per_dropout``), the DDPM train step has 64 fewer
    kernels per step for it (1684), IDDPM's 88 fewer (2208); on 2 CPU cores the train step ran at
    1.00x (0.997x, float32, batch 8, ``benchmarks/variant_ab.py``).
    """
    rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x, seed=None, stream: int = 0):
        if self.deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        if seed is None:
            mask = dropout_keep_mask(self.make_rng("dropout"), x.shape, keep_prob)
        else:
            mask = seeded_keep_mask(_mix32(seed ^ jnp.uint32(stream)), x.shape, keep_prob)
        return jnp.where(mask, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))


def _upsample_nearest(x):
    """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated 2x2."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool2(x):
    """(B, H, W, C) -> (B, H/2, W/2, C), mean of each 2x2 block."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    """Halves H and W: a stride-2 3x3 conv (DDPM, `with_conv=True`) or a 2x2 average pool.

    (B, H, W, C) -> (B, H/2, W/2, C).
    """
    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.with_conv:
            return _conv(x.shape[-1], self.dtype, stride=2, name="conv")(x)
        return _avg_pool2(x)


def _subpixel_taps(kernel, axis: int, parity: int):
    """The 2 taps, along ``axis`` of a 3x3 kernel, that nearest-neighbour 2x upsampling followed by
    the kernel puts on the input: output pixel 2i + parity has its 3 taps on input pixels
    (i - 1, i, i) for parity 0 and (i, i, i + 1) for parity 1, so the taps on the input pixels
    (i - 1 + parity, i + parity) are (k0, k1 + k2) and (k0 + k1, k2)."""
    k0, k1, k2 = (jax.lax.index_in_dim(kernel, i, axis) for i in range(3))
    return jnp.concatenate([k0, k1 + k2] if parity == 0 else [k0 + k1, k2], axis=axis)


def upsample_conv(x, kernel, dtype):
    """A 3x3 'SAME' conv of x (B, H, W, C) upsampled 2x by nearest neighbour, without the
    upsampled image: (B, 2H, 2W, F) in ``dtype`` from a (3, 3, C, F) kernel (no bias).

    Each of the four output phases (row and column parity a, b) is a 2x2 conv of x, its taps the
    sums of the 3x3 taps that land on the same input pixel (sub-pixel convolution), padded by one
    pixel on the side the phase reaches over. That is 16 multiply-adds per input pixel and channel
    pair instead of 36; the result is the same up to float rounding (the taps are summed in float32).
    """
    x, kernel = x.astype(dtype), kernel.astype(jnp.float32)

    def phase(a, b):
        taps = _subpixel_taps(_subpixel_taps(kernel, 0, a), 1, b).astype(dtype)  # (2, 2, C, F)
        return jax.lax.conv_general_dilated(x, taps, (1, 1), ((1 - a, a), (1 - b, b)),
                                            dimension_numbers=_NHWC)

    y = jnp.stack([jnp.stack([phase(a, b) for b in (0, 1)], axis=3) for a in (0, 1)], axis=2)
    batch, height, width, features = x.shape[0], x.shape[1], x.shape[2], kernel.shape[-1]
    return y.reshape(batch, 2 * height, 2 * width, features)  # (B, H, a, W, b, F) -> (B, 2H, 2W, F)


class UpsampleConv(nn.Module):
    """``upsample_conv`` with a bias, and nn.Conv's parameters: ``kernel`` (3, 3, C, F) and
    ``bias`` (F,), initialised as ``_conv``'s, so checkpoints and converted weights are unchanged."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _kernel_init(False), (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return upsample_conv(x, kernel, self.dtype) + bias.astype(self.dtype)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour, then a 3x3 conv if `with_conv` (DDPM), the two computed
    together by ``UpsampleConv``.

    (B, H, W, C) -> (B, 2H, 2W, C).
    """
    with_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.with_conv:
            return UpsampleConv(x.shape[-1], self.dtype, name="conv")(x)
        return _upsample_nearest(x)


class ResBlock(nn.Module):
    """DDPM's residual block, conditioned on the timestep embedding.

    h = conv1(swish(norm1(x))) + dense(swish(emb));  h = conv2(dropout(swish(norm2(h))));
    out = skip(x) + h. conv2 starts at zero, so the block starts as the skip.

    Attributes:
      out_ch: output channels.
      dropout: dropout rate before conv2 (active when `train`; uses the 'dropout' rng).
      conv_shortcut: when channels change, a 3x3 conv skip instead of DDPM's 1x1 (NIN) one.
      scale_shift_norm: IDDPM/ADM adaptive group norm: the embedding gives (scale, shift) and
        norm2's output becomes norm2(h) * (1 + scale) + shift, instead of adding the embedding
        before norm2 (DDPM).
      resample: None, "down" or "up": ADM's BigGAN-style block that resamples (2x2 average pool
        or nearest) both the skip and the main branch, the latter between norm1/swish and conv1
        (upsampling and conv1 together as ``UpsampleConv``).
      dtype: compute dtype.

    ``dropout_seed`` ((2,) uint32), the U-Net's one dropout seed per call, gives the dropout mask
    (hashed with the block's name, see ``Dropout``); without it the dropout draws from the
    'dropout' rng itself.

    ``concat`` (B, H, W, C2), the U-Net's skip connection on the up path, makes the block's input
    x and concat concatenated on the channels. The block never needs that concatenation written out:
    the norm reads it fused, and the NIN shortcut multiplies each part by its rows of the kernel
    (``NinShortcut``).

    Shapes: x (B, H, W, C), emb (B, E) -> (B, H', W', out_ch), with H' = H, H/2 or 2H.
    """
    out_ch: int
    dropout: float
    conv_shortcut: bool = False
    scale_shift_norm: bool = False
    resample: Optional[str] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb, *, train: bool, concat=None, dropout_seed=None):
        parts = (x,) if concat is None else (x, concat)
        x = x if concat is None else jnp.concatenate(parts, axis=-1)
        h = nn.swish(GroupNorm(dtype=self.dtype, name="norm1")(x))
        if self.resample == "up":
            h, x = UpsampleConv(self.out_ch, self.dtype, name="conv1")(h), _upsample_nearest(x)
        else:
            if self.resample == "down":
                h, x = _avg_pool2(h), _avg_pool2(x)
            h = _conv(self.out_ch, self.dtype, name="conv1")(h)

        emb_ch = 2 * self.out_ch if self.scale_shift_norm else self.out_ch
        emb_out = _dense(emb_ch, self.dtype, name="temb_proj")(nn.swish(emb))[:, None, None, :]
        if self.scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm(dtype=self.dtype, name="norm2")(h) * (1 + scale) + shift
        else:
            h = GroupNorm(dtype=self.dtype, name="norm2")(h + emb_out)
        stream = zlib.crc32(str(self.name).encode())  # this block's own masks from the shared seed
        h = Dropout(self.dropout, deterministic=not train)(nn.swish(h), dropout_seed, stream)
        h = _conv(self.out_ch, self.dtype, zero=True, name="conv2")(h)

        if x.shape[-1] != self.out_ch:
            if self.conv_shortcut:
                x = _conv(self.out_ch, self.dtype, name="conv_shortcut")(x)
            else:
                x = NinShortcut(self.out_ch, self.dtype, name="nin_shortcut")(parts)
        return x + h


class NinShortcut(nn.Module):
    """DDPM's NIN (1x1) shortcut of a block's parts concatenated on the channels: nn.Dense's
    parameters ``kernel`` (C, F) and ``bias`` (F,) for C channels in all, computed as the sum of one
    matmul per part (``_matmul_last_axis``), each with its rows of the kernel.

    Over the concatenation, one matmul would have XLA write the concatenated skip connection out
    (the norm reads it fused either way) and split its gradient back. Compiled for an H100
    (``benchmarks/gpu_hlo.py``), the DDPM train step then reads and writes 0.92 GB less per step (28.08
    instead of 29.00 GB: the concatenations' 1.43 GB go, the matmuls per part take 0.53 GB more, and
    the skip connections' gradient is summed where it was split), for 9 more kernels. On 2 CPU cores
    it costs a little: the train step ran at 0.99x, 1.00x and 0.99x of the concatenating form in three
    runs (per-round medians 0.996x, 0.995x, 0.992x), the sampling step at 1.00x
    (``benchmarks/variant_ab.py --arms ddm,concat_skip``); the GPU's time is not measured yet (an
    optional arm of ``gpu_session.sh``'s candidates stage).
    """
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, parts):
        c = sum(p.shape[-1] for p in parts)
        kernel = self.param("kernel", _kernel_init(False), (c, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y, start = None, 0
        for p in parts:
            k = kernel[start:start + p.shape[-1]].astype(self.dtype)
            start += p.shape[-1]
            term = _matmul_last_axis(p.astype(self.dtype), k, (((p.ndim - 1,), (0,)), ((), ())))
            y = term if y is None else y + term
        return y + bias.astype(self.dtype)


# How multi_head_attention computes (UNet.attention).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def multi_head_attention(q, k, v, num_heads: int, implementation: str = "xla"):
    """softmax(q k^T / sqrt(d)) v per head, over all H*W positions: q, k, v (B, H, W, C) -> (B, H, W, C),
    each split into ``num_heads`` heads of d = C / num_heads channels; the softmax runs in float32.

    ``implementation="xla"`` (any device and dtype) moves the heads into the batch axis, so both
    products are plain batched matmuls. With the heads as an einsum axis ("bqnd,bknd->bnqk")
    instead, the DDPM CIFAR-10 U-Net with 4 heads took 1.09x as long per sampling step on 2 CPU
    cores (batch 8); with DDPM's one head the train step was unchanged (1.00x to 1.01x)
    (``benchmarks/variant_ab.py --arms ddm,einsum_heads --num_heads 4``).

    ``implementation="cudnn"`` is cuDNN's fused (flash) attention,
    ``jax.nn.dot_product_attention(implementation="cudnn")``: one kernel forward and one backward,
    so the (B, heads, L, L) logits and weights are never written to memory. It needs an NVIDIA GPU,
    bfloat16 or float16 inputs and d <= 256 on Hopper and later (d <= 128 before), which JAX checks.
    Compiled for an H100 (``benchmarks/gpu_hlo.py --arms ddm,cudnn_attention``), the bfloat16 train
    step at batch 128 moves 1.01 GB less per step with it (41 kernels fewer) for DDPM CIFAR-10, and
    1.41 GB less (55 fewer) for IDDPM's."""
    b, height, width, c = q.shape
    head_ch = c // num_heads
    if implementation == "cudnn":
        # (B, L, heads, d), the layout dot_product_attention takes, is a reshape: no transpose.
        split = lambda a: a.reshape(b, height * width, num_heads, head_ch)
        try:
            h = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation="cudnn")
        except (NotImplementedError, RuntimeError) as e:  # JAX's checks of cuDNN, the GPU and the shapes
            raise ValueError(f"attention implementation 'cudnn' cannot run heads of {head_ch} channels "
                             f"over {height * width} positions in {q.dtype} here: {e} Use 'xla' "
                             f"(UNet.attention, the config's model.attention).") from e
        return h.reshape(q.shape)
    to_heads = lambda a: a.reshape(b, height * width, num_heads, head_ch).swapaxes(1, 2).reshape(
        b * num_heads, height * width, head_ch)
    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    logits = jnp.einsum("bqd,bkd->bqk", q, k) * head_ch ** -0.5
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkd->bqd", weights, v)
    return h.reshape(b, num_heads, height * width, head_ch).swapaxes(1, 2).reshape(b, height, width, c)


class AttnBlock(nn.Module):
    """Self-attention over all H*W positions, with a residual connection.

    One head is DDPM's block; several heads are IDDPM's. q, k, v are separate 1x1 projections
    of GroupNorm(x) (DDPM), each split into `num_heads` heads of C / num_heads channels; the
    attention logits are scaled by (C / num_heads) ** -0.5 and the softmax runs in float32. The
    output projection starts at zero, so the block starts as the identity.

    Shapes: (B, H, W, C) -> (B, H, W, C); C must be divisible by num_heads. `implementation` is
    multi_head_attention's.
    """
    num_heads: int = 1
    dtype: Any = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x):
        h = GroupNorm(dtype=self.dtype, name="norm")(x)
        q, k, v = (_dense(x.shape[-1], self.dtype, name=n)(h) for n in ("q", "k", "v"))
        h = multi_head_attention(q, k, v, self.num_heads, self.implementation)
        return x + _dense(x.shape[-1], self.dtype, zero=True, name="proj_out")(h)


class UNet(nn.Module):
    """The DDPM U-Net with improved DDPM's options.

    The defaults are DDPM's CIFAR-10 network (35.7M parameters for 32x32x3 inputs).

    Attributes:
      ch: base channel count; level i has ch * ch_mult[i] channels; the timestep embedding has
        4 * ch. Must be divisible by the 32 GroupNorm groups. (DDPM)
      ch_mult: channel multiplier per resolution level; the image is halved between levels, so
        H and W must be divisible by 2 ** (len(ch_mult) - 1). (DDPM)
      num_res_blocks: res blocks per level on the way down (one more on the way up). (DDPM)
      attn_resolutions: feature-map sizes (compared with the feature map's height, as DDPM)
        after whose res blocks a self-attention block is inserted; the middle always has one.
        Each must occur, i.e. be H / 2**i for some level i. (DDPM)
      dropout: dropout rate in every res block; 0.1 for DDPM CIFAR-10. (DDPM)
      out_channels: output channels; None means the input's C. A learned variance passes 2 * C
        ([mean part | variance part]). (IDDPM)
      resamp_with_conv: 3x3 convs in the (non-residual) down- and upsampling layers. (DDPM)
      conv_shortcut: 3x3 conv instead of 1x1 on a res block's skip when channels change. (DDPM's
        code; off in its runs)
      resblock_updown: down/upsample with BigGAN-style residual blocks instead of
        Downsample/Upsample. (ADM, in improved-diffusion's successor guided-diffusion)
      num_heads: attention heads in every attention block (1 is DDPM). (IDDPM's code)
      num_head_channels: if > 0, overrides num_heads: each block has channels // num_head_channels
        heads. (ADM)
      scale_shift_norm: adaptive group norm in res blocks (see ResBlock). (IDDPM's code; ADM)
      num_classes: if set, class-conditional: a learned label embedding (num_classes, 4 * ch) is
        added to the timestep embedding, and `y` is required. (IDDPM's code)
      dtype: compute dtype (e.g. jnp.bfloat16); parameters are always float32 and the output is
        float32.
      attention: how the attention blocks compute (`multi_head_attention`): "xla" (any device
        and dtype) or "cudnn" (cuDNN's fused attention: NVIDIA GPUs, bfloat16). The parameters
        are the same either way.

    `__call__(x, t, y=None, *, train)`:
      x: (B, H, W, C) float images (NHWC, in [-1, 1] by the library's convention).
      t: (B,) int32 timestep indices.
      y: (B,) int32 class labels when num_classes is set, else None.
      train: enables dropout, which draws from the 'dropout' rng.
      Returns (B, H, W, out_channels or C) float32.
    """
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    out_channels: Optional[int] = None
    resamp_with_conv: bool = True
    conv_shortcut: bool = False
    resblock_updown: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    scale_shift_norm: bool = False
    num_classes: Optional[int] = None
    dtype: Any = jnp.float32
    attention: str = "xla"

    def _heads(self, channels: int) -> int:
        """Attention heads for a block of `channels` channels; ValueError if they do not fit."""
        if self.num_head_channels > 0:
            if channels % self.num_head_channels:
                raise ValueError(
                    f"UNet.num_head_channels={self.num_head_channels} must divide the channels of "
                    f"every attention block, but one has {channels} channels")
            return channels // self.num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(
                f"UNet.num_heads={self.num_heads} must be a positive divisor of the channels of "
                f"every attention block, but one has {channels} channels")
        return self.num_heads

    def _validate(self, x, t, y):
        """Raises ValueError, naming the field and the allowed values, for a bad config or input."""
        if x.ndim != 4:
            raise ValueError(f"UNet: x must be (B, H, W, C), got shape {x.shape}")
        b, height, width, _ = x.shape
        if jnp.shape(t) != (b,):
            raise ValueError(f"UNet: t must have shape (B,) = ({b},), got {jnp.shape(t)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"UNet.attention={self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        if self.attention == "cudnn" and jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"UNet.attention='cudnn' needs dtype bfloat16 or float16 (cuDNN's fused attention "
                             f"has no float32 kernel), got {jnp.dtype(self.dtype).name}: use attention='xla' "
                             f"or dtype=jnp.bfloat16")
        if self.ch % NUM_GROUPS:
            raise ValueError(
                f"UNet.ch={self.ch} must be divisible by the {NUM_GROUPS} GroupNorm groups")
        factor = 2 ** (len(self.ch_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"UNet.ch_mult={tuple(self.ch_mult)} has {len(self.ch_mult)} levels, so image "
                f"height and width must be divisible by 2**{len(self.ch_mult) - 1}={factor}; got "
                f"{height}x{width}")
        sizes = [height // 2 ** i for i in range(len(self.ch_mult))]
        missing = sorted(set(self.attn_resolutions) - set(sizes))
        if missing:
            raise ValueError(
                f"UNet.attn_resolutions={tuple(self.attn_resolutions)} contains {missing}, which "
                f"never occur for {height}x{width} inputs; the feature-map sizes are {sizes}")
        attn_levels = [i for i, s in enumerate(sizes) if s in self.attn_resolutions]
        for i in attn_levels + [len(self.ch_mult) - 1]:  # the middle block attends too
            self._heads(self.ch * self.ch_mult[i])
        if self.num_classes is not None and y is None:
            raise ValueError(f"UNet.num_classes={self.num_classes}: labels y are required")
        if self.num_classes is None and y is not None:
            raise ValueError("UNet.num_classes=None: the model is unconditional, so y must be None")
        if y is not None and jnp.shape(y) != (b,):
            raise ValueError(f"UNet: y must have shape (B,) = ({b},), got {jnp.shape(y)}")

    @nn.compact
    def __call__(self, x, t, y=None, *, train: bool):
        self._validate(x, t, y)
        out_channels = self.out_channels or x.shape[-1]
        num_levels = len(self.ch_mult)

        emb = timestep_embedding(t, self.ch)
        emb = _dense(4 * self.ch, self.dtype, name="temb_dense0")(emb)
        emb = _dense(4 * self.ch, self.dtype, name="temb_dense1")(nn.swish(emb))
        if self.num_classes is not None:
            emb = emb + nn.Embed(self.num_classes, 4 * self.ch, dtype=self.dtype,
                                 param_dtype=jnp.float32, name="label_emb")(y)

        # One dropout seed for all the res blocks (see Dropout); each hashes it with its name.
        seed = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32) if train and self.dropout else None

        def res_block(h, out_ch, name, resample=None, concat=None):
            return ResBlock(out_ch, self.dropout, conv_shortcut=self.conv_shortcut,
                            scale_shift_norm=self.scale_shift_norm, resample=resample,
                            dtype=self.dtype, name=name)(h, emb, train=train, concat=concat, dropout_seed=seed)

        def attn_block(h, name):
            return AttnBlock(self._heads(h.shape[-1]), dtype=self.dtype, implementation=self.attention,
                             name=name)(h)

        h = _conv(self.ch, self.dtype, name="conv_in")(x)
        hs = [h]
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = res_block(h, self.ch * mult, f"down_{level}_block_{i}")
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(h, f"down_{level}_attn_{i}")
                hs.append(h)
            if level != num_levels - 1:
                name = f"down_{level}_downsample"
                if self.resblock_updown:
                    h = res_block(h, h.shape[-1], name, resample="down")
                else:
                    h = Downsample(self.resamp_with_conv, dtype=self.dtype, name=name)(h)
                hs.append(h)

        h = res_block(h, h.shape[-1], "mid_block_1")
        h = attn_block(h, "mid_attn")
        h = res_block(h, h.shape[-1], "mid_block_2")

        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = res_block(h, self.ch * self.ch_mult[level], f"up_{level}_block_{i}", concat=hs.pop())
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(h, f"up_{level}_attn_{i}")
            if level != 0:
                name = f"up_{level}_upsample"
                if self.resblock_updown:
                    h = res_block(h, h.shape[-1], name, resample="up")
                else:
                    h = Upsample(self.resamp_with_conv, dtype=self.dtype, name=name)(h)

        h = nn.swish(GroupNorm(dtype=self.dtype, name="norm_out")(h))
        h = _conv(out_channels, self.dtype, zero=True, name="conv_out")(h)
        return h.astype(jnp.float32)
