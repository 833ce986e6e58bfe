"""The launch scripts parse (``bash -n``), pass shellcheck when it is installed, and build the
commands the docs promise (their DRY_RUN=1 mode prints them instead of running them)."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh"))
                 + glob.glob(os.path.join(REPO, "launch", "*.sbatch")))


def _name(path: str) -> str:
  return os.path.basename(path)


def test_the_launch_scripts_exist():
  names = {_name(p) for p in SCRIPTS}
  assert {"tpu_vm.sh", "slurm.sbatch", "local_multiprocess.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=_name)
def test_bash_syntax(script):
  r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  with open(script) as f:
    assert f.readline().startswith("#!"), "scripts start with a shebang"


@pytest.mark.parametrize("script", SCRIPTS, ids=_name)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (apt-get install shellcheck)")
  r = subprocess.run(["shellcheck", "--shell=bash", script], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def _dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
  r = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], cwd=REPO,
                     env=dict(os.environ, DRY_RUN="1", **env), capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]


def test_local_multiprocess_starts_one_process_per_id():
  cmds = _dry_run("local_multiprocess.sh", "3", "/tmp/w", "--config.max_steps=5",
                  PORT="23456", DEVICES_PER_PROCESS="2")
  assert len(cmds) == 3
  for i, cmd in enumerate(cmds):
    assert "JAX_PLATFORMS=cpu" in cmd
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in cmd
    main = cmd[cmd.index("-m") + 1:]
    assert main[0] == "rma_jax.main"
    assert main[1:] == ["--config=configs/demo.py", "--workdir=/tmp/w",
                        "--coordinator_address=localhost:23456", "--num_processes=3",
                        f"--process_id={i}", "--config.max_steps=5"]


def test_local_multiprocess_rejects_bad_arguments():
  r = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "two",
                      "/tmp/w"], capture_output=True, text=True, env=dict(os.environ, DRY_RUN="1"))
  assert r.returncode == 2 and "positive integer" in r.stderr


def test_tpu_vm_runs_the_same_command_on_all_workers():
  env = dict(TPU_NAME="rma-pod", ZONE="us-central2-b", PROJECT="my-proj")
  (create,) = _dry_run("tpu_vm.sh", "create", ACCELERATOR_TYPE="v4-32", **env)
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert {"rma-pod", "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-32",
          "--version=tpu-ubuntu2204-base"} <= set(create)

  (run,) = _dry_run("tpu_vm.sh", "run", "--config=configs/voc.py", "--workdir=/mnt/runs/voc",
                    "--config.eval.scales=(512, 640)", **env)
  assert run[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  assert "--worker=all" in run
  remote = next(a for a in run if a.startswith("--command="))[len("--command="):]
  # What every worker's shell executes: the coordinator and the unchanged main command.
  words = shlex.split(remote)
  assert "JAX_COORDINATOR_ADDRESS=WORKER0_IP:8476" in words
  main = words[words.index("-m") + 1:]
  assert main == ["rma_jax.main", "--config=configs/voc.py", "--workdir=/mnt/runs/voc",
                  "--config.eval.scales=(512, 640)"]

  install = _dry_run("tpu_vm.sh", "install", **env)
  assert any("scp" in c and "--worker=all" in c for c in install)
  ssh = install[-1]
  assert "--worker=all" in ssh and "pip install" in ssh[-1] and "jax[tpu]" in ssh[-1]
  assert "[tfds,gcs]" in ssh[-1]  # TFDS data and gs:// paths on every worker


def test_slurm_script_runs_main_under_srun():
  with open(os.path.join(REPO, "launch", "slurm.sbatch")) as f:
    text = f.read()
  assert "#SBATCH --ntasks-per-node" in text and "#SBATCH --gres=gpu:" in text
  assert 'srun --kill-on-bad-exit=1 python -m rma_jax.main "$@"' in text
