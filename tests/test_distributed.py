"""Multi-process training: two processes on localhost (one CPU device each) train through ``python -m ddm.main``
and end with the parameters of one process with two devices; a two-process run resumes from its checkpoint.
Also the flag checks and the cluster detection of ``ddm.distributed``."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddm import distributed, experiment
from test_experiment import TINY, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # per two-process launch: a hang fails the test instead of blocking CI
TREES = ("params", "ema_params", "opt_state", "sampler_state", "key", "step")
NO_TPU = {"TPU_SKIP_MDS_QUERY": "1"}  # what JAX sets off TPU VMs: no libtpu metadata query


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two_processes(workdir: str, num_steps: int, cache_dir: str) -> list[subprocess.Popen]:
    """Start training ``num_steps`` steps with two processes of one CPU device each. They share a persistent
    compilation cache, so a second launch finds the first one's compiled programs in ``cache_dir``."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    address = f"localhost:{free_port()}"
    return [subprocess.Popen([sys.executable, "-m", "ddm.main", "--config=configs/digits.py", f"--workdir={workdir}",
                              *TINY, f"--config.train.num_steps={num_steps}", "--config.train.checkpoint_every=2",
                              f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def wait_for(procs: list[subprocess.Popen]) -> tuple[list[str], list[int]]:
    """The logs and pids of processes that must all exit with 0 within ``TIMEOUT_S``; a hang kills them all."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-3000:]}"
    return logs, [p.pid for p in procs]


def checkpoint(workdir, step: int) -> dict:
    """The raw saved train state of ``step`` (a dict of host arrays)."""
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "default"))


def assert_same_state(got: dict, want: dict) -> None:
    for tree in TREES:
        jax.tree_util.tree_map(np.testing.assert_array_equal, got[tree], want[tree])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with 2 devices, 4 steps (checkpoints at 2 and 4), against two processes with 1 device each:
    2 steps, then a second launch that resumes to 4."""
    root = tmp_path_factory.mktemp("distributed")
    reference, multi, cache = str(root / "reference"), str(root / "multi"), str(root / "jax_cache")
    procs = start_two_processes(multi, 2, cache)
    experiment.train(tiny_config(4), reference)  # meanwhile
    first = wait_for(procs)
    second = wait_for(start_two_processes(multi, 4, cache))
    return reference, multi, first, second


def test_two_processes_train_like_one_process_with_two_devices(runs):
    reference, multi, first, _ = runs
    # Exact: each device computes the same per-device program on the same slice of the global batch, and
    # the all-reduce of 2 gradients is one addition, which is commutative in IEEE arithmetic.
    assert_same_state(checkpoint(multi, 2), checkpoint(reference, 2))
    logs, pids = first
    for i, log in enumerate(logs):
        assert f"process {i} of 2; 1 local and 2 global cpu devices" in log
    # Only process 0 writes (both take part in the checkpoint): its TensorBoard events (the file name ends
    # with the writer's pid), the config and the sample grid.
    writers = {int(n.split(".")[-3]) for n in os.listdir(multi) if n.startswith("events.out.tfevents")}
    assert pids[0] in writers and pids[1] not in writers
    assert os.path.exists(os.path.join(multi, "config.json"))
    assert "sample grid" in logs[0] and "sample grid" not in logs[1]
    assert sorted(os.listdir(os.path.join(multi, "samples"))) == ["step_00000002.png", "step_00000004.png"]


def test_two_processes_resume_from_their_checkpoint(runs):
    reference, multi, _, second = runs
    logs, _ = second
    assert all("resuming from step 2" in log for log in logs)
    assert_same_state(checkpoint(multi, 4), checkpoint(reference, 4))


def test_single_process_without_flags_or_cluster():
    assert distributed.initialize_kwargs(None, None, None, environ=NO_TPU) is None
    slurm = {**NO_TPU, "SLURM_STEP_NODELIST": "node[1-4]", "SLURM_NTASKS": "4"}
    assert distributed.initialize_kwargs(None, 1, None, environ=slurm) is None


def test_explicit_flags_switch_off_cluster_detection():
    assert distributed.initialize_kwargs("node1:1234", 2, 1, environ=NO_TPU) == {
        "coordinator_address": "node1:1234", "num_processes": 2, "process_id": 1,
        "cluster_detection_method": "deactivate"}


@pytest.mark.parametrize("environ, cluster", [
    ({"SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2"}, "slurm"),
    ({"SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "2"}, None),  # the sbatch script itself, outside srun
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
])
def test_cluster_environments_go_to_jax_detection(environ, cluster):
    environ = {**NO_TPU, **environ}
    assert distributed.detected_cluster(environ) == cluster
    assert distributed.initialize_kwargs(None, None, None, environ) == (None if cluster is None else distributed.AUTO)


@pytest.mark.parametrize("flags, match", [
    ((None, 2, 0), r"--num_processes=2 needs --coordinator_address=HOST:PORT"),
    (("node1:1234", 2, None), r"--num_processes=2 needs --process_id: this process's index, 0..1"),
    (("node1:1234", 2, 2), r"--process_id=2 must be in 0..1 \(--num_processes=2\)"),
    (("node1:1234", 2, -1), r"--process_id=-1 must be in 0..1"),
    (("node1", 2, 0), r"--coordinator_address='node1' is not HOST:PORT"),
    (("node1:1234", 0, 0), r"--num_processes=0 must be >= 1"),
    ((None, 1, 1), r"--process_id=1 with --num_processes=1"),
    (("node1:1234", None, None), r"--coordinator_address=node1:1234 was given without --num_processes"),
    ((None, None, 0), r"--process_id=0 was given without --num_processes"),
])
def test_inconsistent_flags_fail_with_the_flag_named(flags, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize_kwargs(*flags, environ=NO_TPU)


def test_cli_refuses_inconsistent_flags_before_touching_devices():
    cmd = [sys.executable, "-m", "ddm.main", "--num_processes=2", "--process_id=2", "--coordinator_address=localhost:1"]
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().endswith("--process_id=2 must be in 0..1 (--num_processes=2); number the processes "
                                          "from 0")
