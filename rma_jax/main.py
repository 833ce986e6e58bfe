r"""The main job: train, evaluate, or predict with a config.

    python -m rma_jax.main --config=configs/demo.py --workdir=/tmp/rma_demo
    python -m rma_jax.main --config=configs/voc.py --workdir=runs/voc --config.optim.batch_size=32
    python -m rma_jax.main --config=configs/voc.py --workdir=runs/voc --mode=evaluate
    python -m rma_jax.main --config=configs/voc.py --workdir=runs/voc --mode=predict \
        --inputs=photos/ --out=predictions/
    python -m rma_jax.main --mode=fuse --fuse_workdirs=runs/voc512,runs/voc640 \
        --workdir=runs/fused    # the paper's two-model fusion (rma_jax.fuse); no --config

Multi-host: start the same command on every host. With --coordinator_address (and
--num_processes, --process_id) or on Cloud TPU / SLURM, ``jax.distributed.initialize()``
connects the processes before anything else touches JAX.
"""

import os
import sys

# TensorFlow is only used by the input pipeline and the TensorBoard writer: keep its C++
# logging quiet and keep it off the accelerators JAX owns.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rma_jax import configs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict", "fuse"], "What to do.")
flags.DEFINE_list("inputs", [], "predict: image files and/or folders.")
flags.DEFINE_string("out", "", "predict: output folder (default WORKDIR/predictions).")
flags.DEFINE_list("fuse_workdirs", [], "fuse: evaluated workdirs whose headline scores are "
                  "averaged (the paper's two-scale fusion); the report goes to WORKDIR/report.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() with "
                  "auto-detection (Cloud TPU VMs, SLURM, JAX_COORDINATOR_ADDRESS).")
flags.mark_flags_as_required(["workdir"])  # --config too, except for --mode=fuse


def _hide_accelerators_from_tf() -> None:
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  tf.config.set_visible_devices([], "GPU")
  tf.config.set_visible_devices([], "TPU")


def _maybe_initialize_distributed() -> None:
  """Connects the processes of a multi-host run; a single process just runs."""
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif (FLAGS.distributed or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "TPU_WORKER_HOSTNAMES" in os.environ or "JAX_COORDINATOR_ADDRESS" in os.environ):
    jax.distributed.initialize()  # auto-detected cluster (SLURM, Cloud TPU, env vars)


class _DropLibraryChatter:
  """Keeps Orbax's per-save INFO lines out of the console; warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  _maybe_initialize_distributed()
  _hide_accelerators_from_tf()
  logging.info("JAX process %d / %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  if FLAGS.mode == "fuse":
    from rma_jax import fuse  # pylint: disable=g-import-not-at-top
    if len(FLAGS.fuse_workdirs) < 2:
      raise app.UsageError("--mode=fuse needs --fuse_workdirs=WORKDIR1,WORKDIR2[,...]")
    fuse.fuse_workdirs(FLAGS.fuse_workdirs, FLAGS.workdir)
    return
  config = FLAGS.config
  if config is None:
    raise app.UsageError(f"--mode={FLAGS.mode} needs --config=CONFIG_FILE")
  from rma_jax import train  # pylint: disable=g-import-not-at-top
  train.validate_config(config)
  if FLAGS.mode == "train":
    train.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == "evaluate":
    from rma_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate_and_report(config, FLAGS.workdir)
  else:
    from rma_jax import predict  # pylint: disable=g-import-not-at-top
    if not FLAGS.inputs:
      raise app.UsageError("--mode=predict needs --inputs=FILE_OR_FOLDER[,...]")
    out = FLAGS.out or os.path.join(FLAGS.workdir, "predictions")
    result = predict.run(config, FLAGS.workdir, FLAGS.inputs, out)
    if not result["images"]:
      raise SystemExit(f"predict: no image was labelled; the {len(result['skipped'])} skipped "
                       f"inputs and why are in {os.path.join(out, 'predictions.json')}")


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, argv=configs.resolve_config_path(sys.argv))  # configs/X.py from anywhere
