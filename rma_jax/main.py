r"""The main job: train, evaluate, or predict with a config.

    python -m rma_jax.main --config=configs/demo.py --workdir=/tmp/rma_demo
    python -m rma_jax.main --config=configs/voc.py --workdir=runs/voc --config.optim.batch_size=32
    python -m rma_jax.main --config=configs/voc.py --workdir=runs/voc --mode=evaluate
    python -m rma_jax.main --config=configs/voc.py --workdir=runs/voc --mode=predict \
        --inputs=photos/ --out=predictions/
    python -m rma_jax.main --mode=fuse --fuse_workdirs=runs/voc512,runs/voc640 \
        --workdir=runs/fused    # the paper's two-model fusion (rma_jax.fuse); no --config

Modes (--mode): train (both stages of the recipe, then the evaluation and the report; resumes
from WORKDIR), evaluate (the report of a trained WORKDIR), predict (label images and draw
their regions), fuse (average evaluated runs). Every config field can be set with
--config.FIELD=VALUE. Library INFO lines (Orbax, clu, JAX) are shown with --verbosity=1.

Multi-host: start the same command on every host. With --coordinator_address (and
--num_processes, --process_id) or on Cloud TPU / SLURM, ``jax.distributed.initialize()``
connects the processes before anything else touches JAX.
"""

import os

# TensorFlow is only used by the input pipeline and the TensorBoard writer: keep its C++
# logging quiet and keep it off the accelerators JAX owns. Its oneDNN CPU kernels (which
# announce themselves on stderr) compute nothing of ours.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app  # (after the environment above: TensorFlow reads it when imported)
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rma_jax import config_checks, console, evaluate, fuse, predict, run

MODES = ("train", "evaluate", "predict", "fuse")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.DEFINE_enum("mode", "train", MODES, "What to do (see the modes above).")
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  console.quiet_library_logs()
  _maybe_initialize_distributed()
  _hide_accelerators_from_tf()
  logging.info("JAX process %d / %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  if FLAGS.mode == "fuse":
    if len(FLAGS.fuse_workdirs) < 2:
      raise app.UsageError("--mode=fuse needs --fuse_workdirs=WORKDIR1,WORKDIR2[,...]")
    fuse.fuse_workdirs(FLAGS.fuse_workdirs, FLAGS.workdir)
    return
  config = FLAGS.config
  if config is None:
    raise app.UsageError(f"--mode={FLAGS.mode} needs --config=CONFIG_FILE")
  if FLAGS.mode == "train":
    run.train_and_evaluate(config, FLAGS.workdir)  # checks the config first
    return
  config_checks.validate_config(config)
  if FLAGS.mode == "evaluate":
    evaluate.evaluate_and_report(config, FLAGS.workdir)
  else:
    if not FLAGS.inputs:
      raise app.UsageError("--mode=predict needs --inputs=FILE_OR_FOLDER[,...]")
    out = FLAGS.out or os.path.join(FLAGS.workdir, "predictions")
    result = predict.run(config, FLAGS.workdir, FLAGS.inputs, out)
    if not result["images"]:
      raise SystemExit(f"predict: no image was labelled; the {len(result['skipped'])} skipped "
                       f"inputs and why are in {os.path.join(out, 'predictions.json')}")


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
