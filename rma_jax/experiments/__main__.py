"""The command line of ``python -m rma_jax.experiments`` (see the package docstring)."""

from __future__ import annotations

import os
import sys
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import logging  # noqa: E402

from rma_jax import configs, console  # noqa: E402
from rma_jax.configs import ablations  # noqa: E402
from rma_jax.experiments import check, runner  # noqa: E402
from rma_jax.experiments import tables as tables_lib  # noqa: E402  (`tables`: the keys)


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from absl import app
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  console.quiet_library_logs()  # library INFO lines as in the main job: --verbosity=1
  import jax
  if FLAGS.compilation_cache:
    # Seeds (and runs with the same architecture and loss) compile identical programs:
    # XLA's persistent cache turns every compile after the first into a file read.
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.info("JAX devices: %s", jax.devices())
  base = FLAGS.config
  tables = ablations.parse_table(FLAGS.table)
  if FLAGS.seeds < 1:
    raise app.UsageError("--seeds must be >= 1")
  if FLAGS.concurrent_trainings < 1:
    raise app.UsageError("--concurrent_trainings must be >= 1")
  seeds = list(range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.seeds))
  if not (FLAGS.results_dir or FLAGS.workdir):
    raise app.UsageError("give --results_dir (and --workdir to train)")
  results_dir = FLAGS.results_dir or os.path.join(FLAGS.workdir, "results")
  if FLAGS.check:
    problems = check.check_page(FLAGS.page, results_dir)
    for p in problems:
      print(p)
    if problems:
      raise SystemExit(f"{len(problems)} problem(s): {FLAGS.page} does not follow from "
                       f"{results_dir}")
    print(f"{FLAGS.page}: every table number follows from {results_dir}")
    return
  if FLAGS.write_only:
    tables_lib.write_tables(base, results_dir, tables, seeds, page=FLAGS.page)
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required to train (or pass --write_only)")
  runner.run_experiments(base, FLAGS.workdir, tables, seeds, results_dir=results_dir,
                  share_stage1=FLAGS.share_stage1, page=FLAGS.page,
                  concurrent_trainings=FLAGS.concurrent_trainings)


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Folder of the runs' checkpoints and reports.")
  flags.DEFINE_string("results_dir", "", "Folder of the per-run records and the tables "
                      "(meant to be committed, e.g. docs/ablations); default "
                      "WORKDIR/results.")
  flags.DEFINE_string("page", "", "A Markdown page (e.g. docs/ablations.md) whose generated "
                      "section is rewritten from the tables; with --check, the page checked.")
  flags.DEFINE_string("table", "all", "3, 4, 5, 6, loss, budget, K, regions, peers, a comma "
                      "list, or all.")
  flags.DEFINE_integer("seeds", 3, "Number of seeds (first_seed, first_seed + 1, ...).")
  flags.DEFINE_integer("first_seed", 0, "The first seed.")
  flags.DEFINE_bool("share_stage1", False, "Train stage 1 once for all seeds (the seed "
                    "spread then covers stage 2 only).")
  flags.DEFINE_integer("concurrent_trainings", 1, "How many trainings share this machine "
                       "(e.g. one runner per seed, --first_seed=S --seeds=1 each): recorded "
                       "in each run's timing; the tables' wall times leave such runs out.")
  flags.DEFINE_string("compilation_cache", "", "A folder for JAX's persistent compilation "
                      "cache (shared by the seeds' identical programs); '' = off.")
  flags.DEFINE_bool("write_only", False, "Only (re)write the tables (and --page) from the "
                    "records in --results_dir.")
  flags.DEFINE_bool("check", False, "Only check that every number in --page's tables "
                    "follows from the JSON in --results_dir (exit 1 if not).")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  from absl import app as _app
  _define_flags()
  _app.run(main, argv=configs.resolve_config_path(sys.argv))  # configs/X.py from anywhere
