"""The launch scripts parse (``bash -n``), pass shellcheck when it is installed, and build the
commands the docs promise (their DRY_RUN=1 mode prints them instead of running them)."""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

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


# Argument text that a shell would act on if it were quoted wrongly on its way to the workers.
_NASTY = {
    "newline": "a\n$(touch PWNED_newline)",
    "single_quote": "it's '$(touch PWNED_squote)'",
    "double_quote": 'say "$(touch PWNED_dquote)" "',
    "command_substitution": "$(touch PWNED_subst)",
    "backtick": "`touch PWNED_backtick`",
    "spaces": "  two  spaces ; touch PWNED_semicolon  ",
    "glob_backslash_dollar": "* \\ $HOME ${PATH} \\n",
    "control_and_non_utf8": b"tab\tbell\x07 latin1\xe9 \xff end\n",
    "empty": "",
}


def _fake_tpu_workers(tmp_path) -> dict[str, str]:
  """A stand-in `gcloud` on PATH that runs `tpu-vm ssh --command=...` locally with `bash -c`
  in a temporary HOME (one "worker"), whose ~/rma_venv/bin/python records its argv."""
  home = tmp_path / "home"
  (home / "rma_jax").mkdir(parents=True)
  (home / "rma_venv" / "bin").mkdir(parents=True)
  record = tmp_path / "argv.jsonl"
  python = home / "rma_venv" / "bin" / "python"
  python.write_text(
      f"#!{sys.executable}\n"
      "import json, os, sys\n"
      f"with open({str(record)!r}, 'a') as f:\n"
      "  f.write(json.dumps({'argv': [os.fsencode(a).hex() for a in sys.argv[1:]],\n"
      "                      'cwd': os.getcwd(),\n"
      "                      'coordinator': os.environ.get('JAX_COORDINATOR_ADDRESS')}) + '\\n')\n")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(
      "#!/usr/bin/env bash\n"
      "set -eu\n"
      'if [[ ${4:-} == describe ]]; then echo 10.0.0.2; exit 0; fi\n'
      'if [[ ${4:-} != ssh ]]; then echo "stand-in gcloud: unexpected $*" >&2; exit 3; fi\n'
      "cmd='' prev=''\n"
      'for a in "$@"; do\n'
      '  if [[ $prev == --command ]]; then cmd=$a; fi\n'
      '  case $a in --command=*) cmd=${a#--command=} ;; esac\n'
      "  prev=$a\n"
      "done\n"
      'cd "$HOME"\n'
      'exec bash -c "$cmd"\n')
  for f in (python, gcloud):
    f.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "DETACH", "PROJECT")}
  env.update(HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
             TPU_NAME="rma-pod", ZONE="us-central2-b")
  return env


@pytest.mark.parametrize("detach", ["0", "1"], ids=["attached", "detached"])
@pytest.mark.parametrize("value", list(_NASTY.values()), ids=list(_NASTY))
def test_tpu_vm_run_passes_every_argument_unchanged(tmp_path, detach, value):
  env = _fake_tpu_workers(tmp_path)
  env["DETACH"] = detach
  value = value if isinstance(value, bytes) else value.encode()
  args = [b"--config=configs/voc.py", b"--config.data.data_dir=" + value, value,
          b"--workdir=/tmp/run dir"]
  r = subprocess.run([b"bash", os.path.join(REPO, "launch", "tpu_vm.sh").encode(), b"run", *args],
                     cwd=tmp_path, env=env, capture_output=True, timeout=60)
  record = tmp_path / "argv.jsonl"
  log = tmp_path / "home" / "rma_run.log"
  deadline = time.monotonic() + 10
  while detach == "1" and not record.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  details = (r.stderr.decode(errors="replace")
             + (log.read_text(errors="replace") if log.exists() else ""))
  pwned = sorted(str(p) for p in tmp_path.rglob("PWNED*")) + glob.glob(
      os.path.join(REPO, "PWNED*"))
  assert not pwned, f"argument text ran as a shell command: {pwned}\n{details}"
  assert r.returncode == 0, details
  assert record.exists(), details
  (line,) = record.read_text().splitlines()
  seen = json.loads(line)
  assert [bytes.fromhex(a) for a in seen["argv"]] == [b"-m", b"rma_jax.main", *args], details
  assert seen["cwd"] == str(tmp_path / "home" / "rma_jax")
  assert seen["coordinator"] == "10.0.0.2:8476"
