"""Running the ablations: every run a table needs, per seed, one at a time, resumable.

Stage 1 of each seed first, then its stage-2 runs (from stage 1's checkpoint) and the
equal-budget baselines; a run whose record exists is skipped, an interrupted one resumes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from absl import logging
import ml_collections

from rma_jax import evaluate, report, train
from rma_jax import workdir as workdir_lib
from rma_jax.configs import ablations
from rma_jax.experiments import records
from rma_jax.experiments import tables as tables_lib  # `tables` names the table keys here


def _config_drift(saved: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """Dotted keys whose value in a record's config differs from ``config``."""
  now = report.to_jsonable(workdir_lib.flatten(config.to_dict()))
  then = workdir_lib.flatten(saved)  # from JSON: lists, as to_jsonable makes tuples
  return sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))


def run_one(base: ml_collections.ConfigDict, run: str, run_dir: str, results_dir: str,
            seed: int, stage1_dir: str = "", *, concurrent_trainings: int = 1
            ) -> dict[str, Any]:
  """Trains and evaluates one run of one seed unless its record exists; returns the record.

  The run trains in ``run_dir`` (resuming from a checkpoint there), its training time is
  kept in ``run_dir/train_timing.json`` (so a run interrupted during evaluation is neither
  trained nor timed again), and its record goes to ``records.record_path(results_dir, seed, run)``.

  Args:
    base: the base config.
    run: a key of ``ablations.RUNS`` or ``ablations.STAGE1``.
    run_dir: the run's working folder (checkpoints, report).
    results_dir: the records' folder.
    seed: the seed.
    stage1_dir: the stage-1 folder a stage-2 run starts from.
    concurrent_trainings: how many trainings share the machine (recorded; see
      ``records.run_record``).
  """
  path = records.record_path(results_dir, seed, run)
  config = ablations.run_config(base, run, stage1_dir=stage1_dir, seed=seed)
  if os.path.exists(path):
    rec = records.load_record(path)
    drift = [k for k in _config_drift(rec.get("config", {}), config)
             if k != "init.from_checkpoint"]  # a path: the workdir may have moved
    if drift:
      logging.warning("seed %d / %s: the record %s was made with a different config (%s); "
                      "kept (delete it to rerun)", seed, run, path, ", ".join(drift[:8]))
    logging.info("seed %d / %s: done already (%s)", seed, run, path)
    return rec
  timing_path = os.path.join(run_dir, "train_timing.json")
  if os.path.exists(timing_path):
    with open(timing_path, encoding="utf-8") as f:
      train_timing = json.load(f)
    logging.info("seed %d / %s: trained already (%s); evaluating", seed, run, timing_path)
  else:
    logging.info("seed %d / %s: training in %s", seed, run, run_dir)
    summary, train_timing = records.timed(lambda: train.train(config, run_dir))
    train_timing["summary"] = summary
    records.write_json(timing_path, train_timing)
    logging.info("seed %d / %s: trained in %.0f s (%s); evaluating", seed, run,
                 train_timing["wall_s"], summary)
  results, eval_timing = records.timed(lambda: evaluate.evaluate_and_report(config, run_dir))
  rec = records.run_record(run=run, seed=seed, config=config, results=results,
                   train_timing=train_timing, eval_timing=eval_timing,
                   concurrent_trainings=concurrent_trainings)
  records.write_json(path, rec)
  logging.info("seed %d / %s: finished (training %.0f s, evaluation %.0f s), %s mAP %.4f; "
               "wrote %s", seed, run, train_timing["wall_s"], eval_timing["wall_s"],
               results["headline"], results["protocols"][results["headline"]]["mAP"], path)
  return rec


def ensure_stage1(base: ml_collections.ConfigDict, stage1_dir: str, results_dir: str,
                  seed: int, *, need_checkpoint: bool, concurrent_trainings: int = 1) -> None:
  """Stage 1 of a seed: trained, evaluated and recorded (``run_one``), and with
  ``need_checkpoint`` its checkpoint present in ``stage1_dir`` for the stage-2 runs.

  When the record exists but the checkpoint does not (committed records, a fresh WORKDIR)
  and stage-2 runs still need it, stage 1 is trained again and the record kept."""
  run_one(base, ablations.STAGE1, stage1_dir, results_dir, seed,
          concurrent_trainings=concurrent_trainings)
  if need_checkpoint and not os.path.exists(os.path.join(stage1_dir, "train_timing.json")):
    logging.warning("seed %d: stage 1 has a record but no checkpoint in %s; training it "
                    "again for the stage-2 runs (the record is kept)", seed, stage1_dir)
    config = ablations.run_config(base, ablations.STAGE1, seed=seed)
    summary, t = records.timed(lambda: train.train(config, stage1_dir))
    records.write_json(os.path.join(stage1_dir, "train_timing.json"), dict(t, summary=summary))


def run_experiments(base: ml_collections.ConfigDict, workdir: str, tables: Sequence[Any],
                    seeds: Sequence[int], *, results_dir: str | None = None,
                    share_stage1: bool = False, page: str = "",
                    concurrent_trainings: int = 1) -> dict[Any, dict[str, Any]]:
  """Trains/evaluates every run the tables need for every seed, one at a time, then writes
  the tables from the records.

  Seeds are the outer loop, so a partial run already has every table for its first seeds
  (marked partial); the tables (and ``page``, if given) are rewritten after each seed.

  Args:
    base: the base config.
    workdir: the folder of the runs' checkpoints and reports.
    tables: keys of ``ablations.TABLES``.
    seeds: the seeds; seed ``s`` runs in ``workdir/seed<s>``.
    results_dir: where the records and tables go (default ``workdir/results``).
    share_stage1: train stage 1 once (``workdir/stage1``, seed ``seeds[0]``, recorded as
      that seed's) for all seeds instead of once per seed: cheaper, but the seed spread
      then covers stage 2 only, and the stage-1 row of the budget table has one seed.
    page: a Markdown page whose generated section is rewritten (``update_page``).
    concurrent_trainings: how many trainings (e.g. other seeds' runners) share the machine;
      recorded, and the tables' wall-time columns leave such runs out.

  Returns:
    table key -> the table dict (see ``collect_table``) of the last write.
  """
  results_dir = results_dir or os.path.join(workdir, "results")
  runs = tables_lib.needed_runs(tables)
  stage2 = [r for r in runs if ablations.run_kind(r) == "stage2"]
  budget = [r for r in runs if ablations.run_kind(r) == "budget"]
  logging.info("tables %s need runs %s for seeds %s; records in %s", list(tables), runs,
               list(seeds), results_dir)
  written: dict[Any, dict[str, Any]] = {}
  for seed in seeds:
    seed_dir = os.path.join(workdir, f"seed{seed}")
    if base.stage1.num_epochs <= 0:
      # No stage 1 to train: every run starts from the given checkpoint (or from scratch /
      # ImageNet weights when there is none), shared by all seeds.
      stage1_dir = base.init.from_checkpoint
      logging.info("stage1.num_epochs = 0: runs start from %r", stage1_dir or "scratch")
    else:
      s1_seed, stage1_dir = ((seeds[0], os.path.join(workdir, ablations.STAGE1))
                             if share_stage1 else
                             (seed, os.path.join(seed_dir, ablations.STAGE1)))
      todo = [r for r in stage2 if not os.path.exists(records.record_path(results_dir, seed, r))]
      if todo or (ablations.STAGE1 in runs and s1_seed == seed):
        ensure_stage1(base, stage1_dir, results_dir, s1_seed, need_checkpoint=bool(todo),
                      concurrent_trainings=concurrent_trainings)
    for run in stage2:
      run_one(base, run, os.path.join(seed_dir, run), results_dir, seed, stage1_dir,
              concurrent_trainings=concurrent_trainings)
    for run in budget:
      run_one(base, run, os.path.join(seed_dir, run), results_dir, seed,
              concurrent_trainings=concurrent_trainings)
    written = tables_lib.write_tables(base, results_dir, tables, seeds, page=page)
  return written
