"""What clusters do to runs: kill -9, SIGTERM, corrupt checkpoints, NaN losses, full disks, changed configs."""
import errno
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddm import checkpoint, data, experiment
from ddm.checkpoint import CheckpointError, Checkpointer
from tests.test_experiment import ROOT, tiny_config

LONG = 200  # steps of the interrupted CLI runs: long enough that the signal lands mid-run


def assert_same_state(a, b):
    assert int(a.step) == int(b.step)
    for tree in ("params", "ema_params", "opt_state"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(a, tree), getattr(b, tree))


def restored_state(config, workdir):
    """The latest checkpoint of ``workdir``, as the trainer would restore it."""
    source = data.load_source(config.data.name, "train", image_size=config.data.image_size)
    model = experiment.build_model(config, data.image_shape(source)[-1])
    sampler = experiment.get_timestep_sampler(config.diffusion.timestep_sampler, config.diffusion.num_timesteps)
    checkpointer = Checkpointer(workdir)
    state = experiment.restore_or_create(config, model, experiment.build_optimizer(config), sampler,
                                         data.image_shape(source), checkpointer)
    checkpointer.close()
    return state


def cli(workdir, num_steps, checkpoint_every, log):
    cmd = [sys.executable, "-m", "ddm.main", "--config=configs/digits.py", f"--workdir={workdir}",
           "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
           "--config.diffusion.num_timesteps=50", "--config.train.batch_size=8", "--config.train.steps_per_call=1",
           f"--config.train.num_steps={num_steps}", "--config.train.log_every=1",
           f"--config.train.checkpoint_every={checkpoint_every}", "--config.train.sample_every=0",
           "--config.sample.steps=5", "--config.sample.grid_size=4", "--config.sample.batch_size=4",
           "--config.sample.num_samples=6"]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log, stderr=log)


def long_config():
    config = tiny_config(LONG)
    config.train.checkpoint_every = 100
    return config


def wait_for(condition, timeout=300):
    start = time.time()
    while not condition():
        if time.time() - start > timeout:
            raise TimeoutError("the condition did not come true in time")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return experiment.train(long_config(), str(tmp_path_factory.mktemp("straight")))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_parameters(tmp_path, uninterrupted, sig):
    workdir, log_path = str(tmp_path / "run"), tmp_path / "log.txt"
    checkpoints = os.path.join(workdir, "checkpoints")
    every = 50 if sig == signal.SIGKILL else 100  # SIGKILL: resume from a periodic checkpoint; SIGTERM: saves its own
    with open(log_path, "w") as log:
        proc = cli(workdir, LONG, every, log)
        if sig == signal.SIGKILL:
            wait_for(lambda: os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints)))
        else:
            wait_for(lambda: "loss=" in log_path.read_text())
        proc.send_signal(sig)
        proc.wait(timeout=300)
    output = log_path.read_text()
    steps = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    assert steps and steps[-1] < LONG, (steps, output[-2000:])
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
        assert f"preempted (SIGTERM): saved checkpoint {steps[-1]}" in output
    else:
        assert proc.returncode == -signal.SIGKILL
    with open(log_path, "w") as log:
        assert cli(workdir, LONG, every, log).wait(timeout=600) == 0, log_path.read_text()[-3000:]
    assert f"resuming from step {steps[-1]}" in log_path.read_text()
    assert_same_state(restored_state(long_config(), workdir), uninterrupted)


def corrupt(step_dir):
    for path in glob.glob(os.path.join(step_dir, "default", "ocdbt.process_0", "d", "*")):
        with open(path, "r+b") as f:
            f.truncate(10)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    experiment.train(tiny_config(4), str(tmp_path / "straight"))
    workdir = str(tmp_path / "run")
    experiment.train(tiny_config(4), workdir)
    corrupt(os.path.join(workdir, "checkpoints", "4"))
    os.makedirs(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1795770000"))  # a save cut short
    resumed = experiment.train(tiny_config(6), workdir)
    assert "checkpoint 4 in" in caplog.text and "cannot be read" in caplog.text
    assert len(os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == 1  # kept for inspection, not deleted
    again = experiment.train(tiny_config(6), str(tmp_path / "straight"))
    assert_same_state(resumed, again)


def test_checkpoint_of_another_architecture_is_not_taken_for_corrupt(tmp_path):
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(1, {"w": np.zeros((4,), np.float32)})
    checkpointer.wait()
    with pytest.raises(ValueError, match=r"\['w'\] of shape \(4,\), but this config builds \(3,\)"):
        checkpointer.restore_latest({"w": np.zeros((3,), np.float32)})
    assert checkpointer.all_steps() == [1]
    checkpointer.close()


def nan_at(step, batches):
    """The trainer's batches, with NaN images in the batch of ``step`` (1-based, as the step counter)."""
    def poisoned(*args, **kwargs):
        for i, batch in enumerate(batches(*args, **kwargs), start=kwargs.get("start_step", 0) + 1):
            if i == step:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield batch
    return poisoned


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(8)
    config.train.steps_per_call = 2  # the NaN step is the first of a 2-step call
    config.train.log_every = 4
    monkeypatch.setattr(experiment.data, "train_batches", nan_at(5, data.train_batches))
    with pytest.raises(FloatingPointError, match=r"non-finite training at step 5: loss=nan.*the last good "
                                                 r"checkpoint is step 4 in .*checkpoints"):
        experiment.train(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_non_finite_state_is_never_saved(tmp_path):
    checkpointer = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"refusing to save step 3: non-finite values in \['b'\]\['w'\]"):
        checkpointer.save(3, {"a": np.zeros(2, np.float32), "b": {"w": np.array([1.0, np.inf], np.float32)}})
    assert checkpointer.all_steps() == []
    checkpointer.close()


def test_unwritable_workdir_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"--workdir=.*file/run is not writable"):
        experiment.train(tiny_config(2), str(blocker / "run"))


def test_full_disk_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1024))
    with pytest.raises(CheckpointError, match=r"has 0.0 MiB free; 2 checkpoints of this train state need"):
        experiment.train(tiny_config(2), str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")


def test_full_disk_at_save_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    experiment.train(tiny_config(2), str(tmp_path))
    real_save = ocp.CheckpointManager.save

    def full(self, step, *args, **kwargs):
        if step > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint 4 .*\(the disk is full\).*intact \(\[2\]\)"):
        experiment.train(tiny_config(4), str(tmp_path))
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    assert int(restored_state(tiny_config(4), str(tmp_path)).step) == 2


def test_changed_architecture_against_the_workdir_fails_before_compute(tmp_path):
    experiment.train(tiny_config(2), str(tmp_path))
    config = tiny_config(4)
    config.model.ch = 16
    config.model.attn_resolutions = (4,)
    with pytest.raises(ValueError, match=r"model.ch=16 \(the run in the workdir has 32\); model.attn_resolutions="
                                         r"\[4\] \(the run in the workdir has \[\]\)\. Use a new --workdir, or go "
                                         r"back to the run's values: --config.model.ch=32 "
                                         r"--config.model.attn_resolutions=\(\)"):
        experiment.train(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


@pytest.mark.parametrize("flag, message", [
    ("--config.train.num_step=5", '--config.train.num_step: the config has no field \'num_step\'. Did you mean '
                                  '"num_steps" instead of "num_step"?'),
    ("--config.trian.num_steps=5", "--config.trian.num_steps: the config has no field 'trian'."),
    ("--config.train.batch_size=abc", "flag --config.train.batch_size=abc: invalid literal for int()"),
])
def test_bad_config_flag_fails_with_the_flag_named(flag, message):
    result = subprocess.run([sys.executable, "-m", "ddm.main", "--workdir=/nonexistent", flag], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_eval_falls_back_past_a_corrupt_checkpoint_too(tmp_path, caplog):
    from ddm import evaluate
    config = tiny_config(4)
    experiment.train(config, str(tmp_path))
    corrupt(os.path.join(tmp_path, "checkpoints", "4"))
    source = data.load_source(config.data.name, "train", image_size=config.data.image_size)
    model = experiment.build_model(config, data.image_shape(source)[-1])
    params, step = evaluate.load_params(config, str(tmp_path), model, data.image_shape(source))
    assert step == 2 and "checkpoint 4 in" in caplog.text
    expected = restored_state(config, str(tmp_path)).ema_params[experiment.ema_key(config.optim.ema_rates[0])]
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
