import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_local_launcher_dry_run_prints_the_command():
    env = dict(os.environ, CONFIG="configs/digits.py", WORKDIR="/tmp/w")
    out = subprocess.run(["bash", "launch/local.sh", "--dry-run", "--mode=sample"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["python", "-m", "ddm.main", "--config=configs/digits.py", "--workdir=/tmp/w", "--mode=sample"]
