"""Respacing: run a diffusion on a subset of its timesteps (IDDPM section 4, DDIM's strided steps)."""
import numpy as np

from ddm.diffusion import Diffusion, make_diffusion


def _fail(spec, why: str):
    raise ValueError(f"cannot respace with spec={spec!r}: {why}")


def _ddim_stride(num_timesteps: int, count: int, spec) -> list:
    """DDIM's uniform stride: range(0, T, k) for the integer k that gives exactly ``count`` steps."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    if count == num_timesteps:
        return list(range(num_timesteps))
    _fail(spec, f"no integer stride gives exactly {count} of {num_timesteps} steps; try a nearby count, "
                f"or the plain section spec {str(count)!r}")


def _quadratic(num_timesteps: int, count: int, spec) -> list:
    """DDIM's quadratic skip (its best CIFAR-10 FID): tau_i = floor((i * sqrt(0.8 T) / (S - 1))^2).

    DDIM's own sequence repeats its first values (0, 0, 1, ...); a repeated step is moved to the
    next free index, so exactly S distinct steps are kept and the rest of the sequence is DDIM's.
    """
    steps = (np.linspace(0, np.sqrt(num_timesteps * 0.8), count) ** 2).astype(int).tolist()
    for i in range(1, count):  # stays below T: the sequence ends at 0.8 T and count <= T
        steps[i] = max(steps[i], steps[i - 1] + 1)
    return steps


def _sections(num_timesteps: int, counts: list, spec) -> list:
    """improved-diffusion's sections: split [0, T) into len(counts) equal parts, take counts[i]
    evenly strided steps (rounded) from part i."""
    size_per, extra = divmod(num_timesteps, len(counts))
    start, taken = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            _fail(spec, f"section {i} has {size} steps, cannot take {count} (allowed 1..{size})")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        taken += [start + round(stride * j) for j in range(count)]
        start += size
    return taken


def space_timesteps(num_timesteps: int, spec) -> np.ndarray:
    """The sorted original timestep indices to keep, as an int array.

    spec: an int or "50" (50 evenly spread steps); "10,15,20" or [10, 15, 20] (split [0, T) into
    three equal sections and take that many steps from each, IDDPM); "ddim50" (DDIM's uniform
    integer stride, which must give exactly 50); "quad50" (DDIM's quadratic skip).
    """
    if isinstance(spec, str):
        text = spec.strip()
        for prefix, method in (("ddim", _ddim_stride), ("quad", _quadratic)):
            if text.startswith(prefix):
                count = text[len(prefix):]
                if not count.isdigit() or not 1 <= int(count) <= num_timesteps:
                    _fail(spec, f"expected {prefix}N with N in 1..{num_timesteps}")
                return np.asarray(method(num_timesteps, int(count), spec), dtype=np.int64)
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            _fail(spec, "allowed forms: an int, '50', '10,15,20', 'ddim50', 'quad50'")
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        counts = [int(spec)]
    elif isinstance(spec, (list, tuple)) and all(isinstance(c, (int, np.integer)) for c in spec) and spec:
        counts = [int(c) for c in spec]
    else:
        _fail(spec, "allowed forms: an int, '50', '10,15,20', [10, 15, 20], 'ddim50', 'quad50'")
    return np.asarray(_sections(num_timesteps, counts, spec), dtype=np.int64)


def respace(diffusion: Diffusion, timesteps) -> Diffusion:
    """The diffusion restricted to ``timesteps`` (indices into ``diffusion``'s own steps).

    alpha-bar is kept at the kept steps: the new betas are 1 - ab[k_i] / ab[k_{i-1}] (computed in
    float64), and the model is still called with the original timestep indices (composed with
    any earlier respacing through ``timestep_map``).
    """
    timesteps = np.asarray(timesteps)
    num_timesteps = diffusion.num_timesteps
    if (timesteps.ndim != 1 or timesteps.size < 2 or np.any(np.diff(timesteps) <= 0)
            or timesteps[0] < 0 or timesteps[-1] >= num_timesteps):
        raise ValueError(f"timesteps must be >= 2 strictly increasing indices in [0, {num_timesteps}), got {timesteps}")
    alphas_cumprod = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)[timesteps]
    betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return make_diffusion(betas, diffusion.mean_type, diffusion.var_type, diffusion.loss_type,
                          timestep_map=np.asarray(diffusion.timestep_map)[timesteps])
