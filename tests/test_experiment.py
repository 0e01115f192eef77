"""Train and sample runs end to end: bit-exact resume, the CLI, the TFDS path offline, bad configs."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import digits
from ddm import data, experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()", "--config.diffusion.num_timesteps=50",
        "--config.train.batch_size=8", "--config.train.steps_per_call=1", "--config.train.num_steps=2",
        "--config.train.log_every=1", "--config.train.checkpoint_every=1", "--config.sample.steps=5",
        "--config.sample.grid_size=4", "--config.sample.batch_size=4", "--config.sample.num_samples=6"]


def tiny_config(num_steps=4):
    config = digits.get_config()
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = 50
    config.train.batch_size = 8
    config.train.steps_per_call = 1
    config.train.num_steps = num_steps
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.sample_every = 0
    config.sample.steps = 5
    config.sample.grid_size = 4
    config.sample.batch_size = 4
    config.sample.num_samples = 6
    return config


def test_resumed_run_ends_with_the_same_parameters(tmp_path):
    straight = experiment.train(tiny_config(4), str(tmp_path / "straight"))
    experiment.train(tiny_config(2), str(tmp_path / "stopped"))  # "preempted" after step 2
    resumed = experiment.train(tiny_config(4), str(tmp_path / "stopped"))
    assert int(straight.step) == int(resumed.step) == 4
    for tree in ("params", "ema_params", "opt_state"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(straight, tree), getattr(resumed, tree))
    assert sorted(os.listdir(tmp_path / "straight" / "checkpoints")) == ["2", "4"]
    assert os.path.exists(tmp_path / "straight" / "samples" / "step_00000004.png")
    path = experiment.sample(tiny_config(4), str(tmp_path / "straight"))
    images = np.load(path)["images"]
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
    assert os.path.exists(tmp_path / "straight" / "samples.png")


def test_cli_trains_then_samples(tmp_path):
    workdir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT)
    for mode in ("train", "sample"):
        cmd = [sys.executable, "-m", "ddm.main", "--config=configs/digits.py", f"--workdir={workdir}",
               f"--mode={mode}", *TINY]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert np.load(os.path.join(workdir, "samples.npz"))["images"].shape == (6, 8, 8, 1)
    assert os.listdir(os.path.join(workdir, "samples")) == ["step_00000002.png"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))


def test_cifar10_through_tfds_mock_data(tmp_path):
    config = tiny_config(1)
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.random_flip = True
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        state = experiment.train(config, str(tmp_path))
    assert int(state.step) == 1
    assert state.params["conv_in"]["kernel"].shape == (3, 3, 3, 32)  # RGB in


def test_unprepared_dataset_fails_before_compute(tmp_path):
    config = tiny_config(1)
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.data_dir = str(tmp_path / "empty")
    with pytest.raises(data.DatasetNotFoundError, match="empty"):
        experiment.train(config, str(tmp_path / "run"))


def test_sample_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*train first with --mode=train"):
        experiment.sample(tiny_config(), str(tmp_path))


@pytest.mark.parametrize("field, value, match", [
    ("train.batch_size", 7, r"train.batch_size=7 is not divisible by the 2 local devices"),
    ("train.log_every", 3, r"train.log_every=3 must be a multiple of train.steps_per_call=2"),
    ("data.image_size", 9, r"data.image_size=9 is not divisible by 2\*\*1"),
    ("sample.respacing", "log", r"unknown sample.respacing='log'; allowed: 'uniform', 'ddim', 'quad'"),
    ("sample.steps", 500, r"sample.steps=500 must be in 2..50"),
])
def test_bad_config_fails_with_the_field_named(field, value, match):
    config = tiny_config()
    config.model.ch_mult = (1, 2)
    config.train.steps_per_call = 2
    config.train.log_every = 2
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=match):
        experiment.validate(config, jax.local_device_count())
        experiment.build_sampling_diffusion(config, experiment.build_diffusion(config))


@pytest.mark.parametrize("dtype, attention, match", [
    ("bfloat16", "flash", r"unknown model.attention='flash'; allowed: 'xla', 'cudnn'"),
    ("float32", "cudnn", r"model.attention='cudnn' needs model.dtype='bfloat16'.*--config.model.dtype=bfloat16"),
    ("bfloat16", "cudnn", r"model.attention='cudnn' runs on NVIDIA GPUs only.*'cpu'.*--config.model.attention=xla"),
])
def test_bad_attention_fails_with_the_field_named(dtype, attention, match):
    config = tiny_config()
    config.model.dtype, config.model.attention = dtype, attention
    with pytest.raises(ValueError, match=match):
        experiment.build_model(config, 1)


def test_build_model_passes_the_attention_implementation(monkeypatch):
    monkeypatch.setattr(jax.Device, "client", property(lambda d: type("C", (), {"platform_version": "cuda 12090"})),
                        raising=False)
    config = tiny_config()
    config.model.dtype, config.model.attention = "bfloat16", "cudnn"
    assert experiment.build_model(config, 1).attention == "cudnn"
    assert experiment.build_model(tiny_config(), 1).attention == "xla"


def test_builders_import_without_tensorflow():
    # The benchmarks on an accelerator image (no TensorFlow, clu or tensorflow-datasets there) use
    # experiment's builders: only experiment.train may need clu's TensorFlow writers.
    code = ("import sys\n"
            "for name in ('tensorflow', 'tensorflow_datasets', 'clu', 'keras'): sys.modules[name] = None\n"
            "from ddm import experiment\n"
            "from configs import cifar10_linear\n"
            "config = cifar10_linear.get_config()\n"
            "model = experiment.build_model(config, 3)\n"
            "print(type(model).__name__, experiment.build_diffusion(config).num_timesteps)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["UNet", "1000"]
