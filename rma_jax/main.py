r"""The main job: train, evaluate, or predict with a config.

    python -m rma_jax.main --config=configs/demo.py --workdir=/tmp/rma_demo
    python -m rma_jax.main --config=configs/voc.py --workdir=runs/voc --config.optim.batch_size=32
    python -m rma_jax.main --config=configs/voc.py --workdir=runs/voc --mode=evaluate
    python -m rma_jax.main --config=configs/voc.py --workdir=runs/voc --mode=predict \
        --inputs=photos/ --out=predictions/
    python -m rma_jax.main --config=configs/voc.py --workdir=runs/voc --mode=export \
        --formats=stablehlo,onnx    # files to serve the trained model (rma_jax.export)
    python -m rma_jax.main --mode=fuse --fuse_workdirs=runs/voc512,runs/voc640 \
        --workdir=runs/fused    # the paper's two-model fusion (rma_jax.fuse); no --config
    python -m rma_jax.main --config=configs/voc.py --mode=show_config   # the config a run uses

Modes (--mode): train (both stages of the recipe, then the evaluation and the report; resumes
from WORKDIR), evaluate (the report of a trained WORKDIR), predict (label images and draw
their regions), export (the best checkpoint as StableHLO / ONNX files to serve), fuse
(average evaluated runs), show_config (print the config and stop).
Every config field can be set with --config.FIELD=VALUE; --help lists them with their
defaults. A run refused for a reason you can fix (a config value, unusable data, a workdir in
use, a missing file) prints one line that names the field or file and the fix, and exits with
status 2. --verbosity=1 shows library INFO lines (Orbax, clu, JAX) and such a refusal's
traceback.

Multi-host: start the same command on every host. With --coordinator_address (and
--num_processes, --process_id) or on Cloud TPU / SLURM, ``jax.distributed.initialize()``
connects the processes before anything else touches JAX.
"""

import os
import sys

# TensorFlow is only imported by the TFDS reader (rma_jax.data.tfds_source, which keeps it off
# the accelerators JAX owns): keep its C++ logging quiet. Its oneDNN CPU kernels (which
# announce themselves on stderr) compute nothing of ours.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import importlib.util  # (after the environment above: TensorFlow reads it when imported)
import pathlib

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from rma_jax import configs
from rma_jax import (config_checks, console, errors, evaluate, export, fuse, predict, preemption,
                     run)
from rma_jax import workdir as workdir_lib

MODES = ("train", "evaluate", "predict", "export", "fuse", "show_config")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.DEFINE_enum("mode", "train", MODES, "What to do (see the modes above).")
flags.DEFINE_list("inputs", [], "predict: image files and/or folders.")
flags.DEFINE_string("out", "", "predict, export: output folder (default WORKDIR/predictions, "
                    "WORKDIR/export).")
flags.DEFINE_list("formats", ["stablehlo"], "export: stablehlo and/or onnx (the .[export] "
                  "extra).")
flags.DEFINE_bool("overwrite", False, "export: replace the export an --out folder holds.")
flags.DEFINE_list("fuse_workdirs", [], "fuse: evaluated workdirs whose headline scores are "
                  "averaged (the paper's two-scale fusion); the report goes to WORKDIR/report.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() with "
                  "auto-detection (Cloud TPU VMs, SLURM, JAX_COORDINATOR_ADDRESS).")

DEFAULT_CONFIG = pathlib.Path(configs.config_file("default"))
_HELP = ("--help", "-help", "--helpshort", "-helpshort", "-?", "-h", "--helpfull", "-helpfull")


def _maybe_initialize_distributed() -> None:
  """Connects the processes of a multi-host run; a single process just runs."""
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif (FLAGS.distributed or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "TPU_WORKER_HOSTNAMES" in os.environ or "JAX_COORDINATOR_ADDRESS" in os.environ):
    jax.distributed.initialize()  # auto-detected cluster (SLURM, Cloud TPU, env vars)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  console.quiet_library_logs()
  if FLAGS.mode == "show_config":
    if FLAGS.config is None:
      raise app.UsageError("--mode=show_config needs --config=CONFIG_FILE")
    print(FLAGS.config)
    return
  if FLAGS.workdir is None:
    raise app.UsageError(f"--mode={FLAGS.mode} needs --workdir=DIR")
  if FLAGS.mode == "fuse" and len(FLAGS.fuse_workdirs) < 2:
    raise app.UsageError("--mode=fuse needs --fuse_workdirs=WORKDIR1,WORKDIR2[,...]")
  if FLAGS.mode != "fuse" and FLAGS.config is None:
    raise app.UsageError(f"--mode={FLAGS.mode} needs --config=CONFIG_FILE")
  if FLAGS.mode == "predict" and not FLAGS.inputs:
    raise app.UsageError("--mode=predict needs --inputs=FILE_OR_FOLDER[,...]")
  _maybe_initialize_distributed()
  logging.info("JAX process %d / %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    run_mode(FLAGS.mode, FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as e:
    # Stopped by SIGTERM / SIGINT once the work so far was saved: the status asks a
    # scheduler to requeue the job (rma_jax.preemption).
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_status)
  except (errors.UserError, FileNotFoundError) as e:
    if FLAGS.verbosity >= 1:
      raise
    # A refusal the user acts on: its message names the field or file and the fix.
    print(f"error: {e}", file=sys.stderr, flush=True)
    if isinstance(e, errors.StorageError):
      # A failed save's background writers may never finish (a read-only or full disk): the
      # process ends now, and with it the workdir's lock (held until then: workdir.hold).
      sys.stdout.flush()
      os._exit(errors.EXIT_STATUS)  # pylint: disable=protected-access
    sys.exit(errors.EXIT_STATUS)


def run_mode(mode: str, config: ml_collections.ConfigDict | None, workdir: str) -> None:
  """What ``--mode`` asks for, once the flags are checked."""
  workdir_lib.check_path(workdir)
  if mode == "fuse":
    fuse.fuse_workdirs(FLAGS.fuse_workdirs, workdir)
  elif mode == "train":
    run.train_and_evaluate(config, workdir)  # checks the config first
  else:
    config_checks.validate_config(config)
    if mode == "evaluate":
      with preemption.StopSignals() as stop:
        evaluate.evaluate_and_report(config, workdir, stop=stop)
      return
    if mode == "export":
      export.run(config, workdir, FLAGS.out or os.path.join(workdir, "export"),
                 formats=FLAGS.formats, overwrite=FLAGS.overwrite)
      return
    out = FLAGS.out or os.path.join(workdir, "predictions")
    result = predict.run(config, workdir, FLAGS.inputs, out)
    if not result["images"]:
      raise errors.UserError(
          f"predict: no image was labelled; the {len(result['skipped'])} skipped inputs and "
          f"why are in {os.path.join(out, 'predictions.json')}")


# ----------------------------------------------------------------------------- --help


def _config_file(argv: list[str]) -> pathlib.Path:
  """The --config file named in ``argv`` (without its ':override' part), else the defaults."""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return pathlib.Path(arg.split("=", 1)[1].split(":", 1)[0])
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return pathlib.Path(argv[i + 1].split(":", 1)[0])
  return DEFAULT_CONFIG


def config_fields(path: pathlib.Path) -> list[str]:
  """``--config.FIELD=DEFAULT`` for every field of the config file ``path``."""
  spec = importlib.util.spec_from_file_location(f"_help_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config: ml_collections.ConfigDict = module.get_config()
  return [f"  --config.{k}={v!r}" for k, v in workdir_lib.flatten(config.to_dict()).items()]


def print_help(argv: list[str]) -> None:
  """The docstring, this module's flags (all flags for --helpfull) and the config fields."""
  app.usage(shorthelp=not any(a in ("--helpfull", "-helpfull") for a in argv),
            writeto_stdout=True)
  path = _config_file(argv)
  print()
  print(f"config fields of {path} (set with --config.FIELD=VALUE; print a whole config "
        "with --mode=show_config):")
  try:
    print("\n".join(config_fields(path)))
  except Exception as e:  # pylint: disable=broad-except  # a broken file must not hide help
    print(f"  (cannot read {path}: {type(e).__name__}: {e})")
  print("\nLibrary INFO lines (Orbax, clu, JAX): --verbosity=1. All absl and JAX flags: "
        "--helpfull.")


if __name__ == "__main__":
  _argv = configs.resolve_config_path(sys.argv)  # configs/X.py from any directory
  if any(arg in _HELP for arg in _argv[1:]):
    print_help(_argv[1:])
    sys.exit(0)
  jax.config.config_with_absl()
  app.run(main, argv=_argv)
