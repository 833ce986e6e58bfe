r"""The paper's ablations (Tables 3–6), reproducible: train, evaluate, tabulate, plot.

    python -m rma_jax.experiments --config=configs/demo.py --table=4 --seeds=3 --workdir=DIR
    python -m rma_jax.experiments --config=configs/voc.py --table=all --seeds=1 --workdir=DIR

For each seed ``s`` the stage-1 baseline (the first step of the paper's two-step recipe) is
trained once in ``DIR/seed<s>/stage1``; every attention run of that seed starts from it
(``init.from_checkpoint``) and lives in ``DIR/seed<s>/<run>`` (runs are listed in
``configs/ablations.py``). A run is trained, then evaluated once under every protocol (single
view and ten views, at both scales, fused); each table row reads its protocol from that
report. Everything resumes: a run whose ``report/report.json`` exists is skipped, an
interrupted one resumes from its last checkpoint. Then, per table:

* ``DIR/table_<t>.md``: the table in the paper's layout, mean ± sample std (ddof = 1) over the
  seeds in %, the per-seed values and the paper's published numbers beside ("—" where the
  data set is neither VOC 2007 nor MS-COCO 2014 or the paper has no such row);
* ``DIR/table_<t>.json``: the same numbers (fractions) and the protocol behind each row;
* ``DIR/table_<t>.png``: bars with ± std error bars and the per-seed points.

``DIR/attention_recall.png`` compares the attention recall of the model's regions with that of
the fixed anchor boxes for every attention run (the figure of the evaluation report), and
``DIR/summary.md`` collects every table written so far.

Any config field can be overridden as for ``rma_jax.main``: ``--config.optim.num_epochs=6``.
Nothing here imports TensorFlow (the input pipeline does, lazily, when a run starts).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import logging
import ml_collections
import numpy as np

from configs import ablations

PAPER_DATASETS = ("voc2007", "coco2014")
METRIC_LABELS = {"mAP": "mAP", "CF1": "C-F1", "OF1": "O-F1",
                 "attention_recall": "attention recall"}
DASH = "—"


# --------------------------------------------------------------------------- running


def _report_path(run_dir: str) -> str:
  return os.path.join(run_dir, "report", "report.json")


def _stage1_done(stage1_dir: str) -> str:
  return os.path.join(stage1_dir, "stage1_done.json")


def needed_runs(tables: Sequence[Any]) -> list[str]:
  """The runs the tables need, each once, in first-use order."""
  runs: list[str] = []
  for t in tables:
    for v in ablations.TABLES[t]:
      if v.run not in runs:
        runs.append(v.run)
  return runs


def train_stage1(base: ml_collections.ConfigDict, parent: str, seed: int) -> str:
  """Trains a stage-1 baseline in ``parent/stage1`` once (skipped when done); returns that
  folder."""
  from rma_jax import train
  stage1_dir = os.path.join(parent, "stage1")
  if os.path.exists(_stage1_done(stage1_dir)):
    logging.info("seed %d: stage 1 already trained in %s", seed, stage1_dir)
    return stage1_dir
  config = ablations.stage1_config(ablations.apply_overrides(base, {"seed": seed}))
  logging.info("seed %d: training stage 1 (baseline, %s epochs) in %s", seed,
               config.optim.num_epochs, stage1_dir)
  start = time.time()
  summary = train.train(config, stage1_dir)
  with open(_stage1_done(stage1_dir), "w") as f:
    json.dump(dict(summary, seconds=time.time() - start), f)
  logging.info("seed %d: stage 1 done in %.0f s: %s", seed, time.time() - start, summary)
  return stage1_dir


def run_one(base: ml_collections.ConfigDict, run: str, seed_dir: str, seed: int,
            stage1_dir: str) -> dict[str, Any]:
  """Trains and evaluates one run of one seed unless its report exists; returns the results."""
  from rma_jax import evaluate, train
  run_dir = os.path.join(seed_dir, run)
  path = _report_path(run_dir)
  if os.path.exists(path):
    logging.info("seed %d / %s: done already (%s)", seed, run, path)
    return load_results(run_dir)
  config = ablations.run_config(base, run, stage1_dir=stage1_dir, seed=seed)
  logging.info("seed %d / %s: training in %s", seed, run, run_dir)
  start = time.time()
  summary = train.train(config, run_dir)
  logging.info("seed %d / %s: trained in %.0f s (%s); evaluating", seed, run,
               time.time() - start, summary)
  results = evaluate.evaluate_and_report(config, run_dir)
  logging.info("seed %d / %s: finished in %.0f s, headline %s mAP %.4f", seed, run,
               time.time() - start, results["headline"],
               results["protocols"][results["headline"]]["mAP"])
  return results


def load_results(run_dir: str) -> dict[str, Any]:
  """The evaluation results of a finished run (``report/report.json``)."""
  with open(_report_path(run_dir), encoding="utf-8") as f:
    return json.load(f)["results"]


def run_experiments(base: ml_collections.ConfigDict, workdir: str, tables: Sequence[Any],
                    seeds: Sequence[int], *, share_stage1: bool = False
                    ) -> dict[Any, dict[str, Any]]:
  """Trains/evaluates every run the tables need for every seed, then writes the tables.

  Seeds are the outer loop, so a partial run already has every table for its first seeds.
  The tables are rewritten after each seed.

  Args:
    base: the base config.
    workdir: the folder of the runs and tables.
    tables: keys of ``ablations.TABLES``.
    seeds: the seeds; seed ``s`` runs in ``workdir/seed<s>``.
    share_stage1: train stage 1 once (``workdir/stage1``, seed ``seeds[0]``) for all seeds
      instead of once per seed: cheaper, but the seed spread then covers stage 2 only.

  Returns:
    table key -> the table dict (see ``collect_table``) of the last write.
  """
  runs = needed_runs(tables)
  logging.info("tables %s need runs %s for seeds %s", list(tables), runs, list(seeds))
  written: dict[Any, dict[str, Any]] = {}
  for i, seed in enumerate(seeds):
    seed_dir = os.path.join(workdir, f"seed{seed}")
    needs_stage1 = any(not os.path.exists(_report_path(os.path.join(seed_dir, r)))
                       for r in runs)
    stage1_home, stage1_seed = (workdir, seeds[0]) if share_stage1 else (seed_dir, seed)
    if base.stage1.num_epochs <= 0:
      # No stage 1 to train: every run starts from the given checkpoint (or from scratch /
      # ImageNet weights when there is none), shared by all seeds.
      stage1_dir = base.init.from_checkpoint
      logging.info("stage1.num_epochs = 0: runs start from %r", stage1_dir or "scratch")
    elif needs_stage1:
      stage1_dir = train_stage1(base, stage1_home, stage1_seed)
    else:
      stage1_dir = os.path.join(stage1_home, "stage1")
    for run in runs:
      run_one(base, run, seed_dir, seed, stage1_dir)
    written = write_tables(base, workdir, tables, seeds[:i + 1])
  return written


# --------------------------------------------------------------------------- tables


def metric_value(results: Mapping[str, Any], protocol: str, metric: str) -> float:
  """One number of a run's results: a protocol's metric, or the run's attention recall of
  its K regions (single view); NaN when absent (e.g. the baseline has no regions)."""
  if metric == "attention_recall":
    value = results.get("attention_recall", {}).get("model_regions")
  else:
    value = results["protocols"][protocol].get(metric)
  return float("nan") if value is None else float(value)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof = 1; NaN for a single value), NaNs dropped."""
  v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def collect_table(base: ml_collections.ConfigDict, table: Any,
                  per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
  """Assembles a table from the results of its runs.

  Args:
    base: the base config (data set name, scales).
    table: a key of ``ablations.TABLES``.
    per_seed: seed -> run name -> that run's evaluation results (``evaluate_and_report``).

  Returns:
    A JSON-ready dict: ``table``, ``title``, ``dataset``, ``ap_mode``, ``seeds``,
    ``metrics``, ``paper_datasets`` and ``rows``: per row ``name``, ``run``, ``protocol``
    (the report key), ``values`` (metric -> per-seed fractions), ``mean``/``std`` (metric ->
    fraction) and ``paper`` (data set -> metric -> % as published).
  """
  metrics = ablations.TABLE_METRICS[table]
  seeds = sorted(per_seed)
  rows = []
  for v in ablations.TABLES[table]:
    protocol = ablations.protocol_name(base, v.protocol)
    values = {m: [metric_value(per_seed[s][v.run], protocol, m) for s in seeds]
              for m in metrics}
    stats = {m: mean_std(values[m]) for m in metrics}
    n, n2 = ablations.scales(base)
    name = v.name.replace("s=N2", f"s={n2}").replace("s=N", f"s={n}")
    rows.append({"name": name, "run": v.run, "protocol": protocol, "values": values,
                 "mean": {m: stats[m][0] for m in metrics},
                 "std": {m: stats[m][1] for m in metrics},
                 "paper": {d: dict(p) for d, p in v.paper.items()}})
  return {"table": table, "title": ablations.TABLE_TITLES[table],
          "dataset": base.data.name, "ap_mode": base.eval.ap_mode, "seeds": seeds,
          "metrics": list(metrics), "paper_datasets": list(ablations.TABLE_PAPER_DATASETS[table]),
          "rows": rows}


def _pct(x: float | None) -> str:
  return DASH if x is None or math.isnan(x) else f"{100 * x:.1f}"


def format_mean_std(mean: float, std: float) -> str:
  """'87.3 ± 1.2' in %; the mean alone when the std is undefined; '—' without a value."""
  if mean is None or math.isnan(mean):
    return DASH
  if std is None or math.isnan(std):
    return _pct(mean)
  return f"{100 * mean:.1f} ± {100 * std:.1f}"


def table_markdown(table: Mapping[str, Any]) -> str:
  """The table in the paper's layout: one row per variant, the measured metrics as
  mean ± std (%) over seeds, the per-seed values, and the paper's numbers for the data set
  the table was published on ("—" when this run's data set is another one)."""
  metrics = table["metrics"]
  dataset = table["dataset"]
  paper_sets = [d for d in table["paper_datasets"]]
  n = len(table["seeds"])
  header = [table.get("row_header", "variant")]
  header += [f"{METRIC_LABELS.get(m, m)} (mean ± std, %)" for m in metrics]
  header += [f"{METRIC_LABELS.get(m, m)} per seed" for m in metrics]
  paper_cols = [(d, m) for d in paper_sets for m in metrics if m != "attention_recall"]
  header += [f"paper {METRIC_LABELS.get(m, m)} ({d})" for d, m in paper_cols]
  header += ["protocol"]
  lines = [f"### {table['title']}", "",
           f"Data set: {dataset}; {n} seed(s) {table['seeds']}; AP: {table['ap_mode']}; "
           "numbers in %.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in table["rows"]:
    cells = [row["name"]]
    cells += [format_mean_std(row["mean"][m], row["std"][m]) for m in metrics]
    cells += [", ".join(_pct(x) for x in row["values"][m]) for m in metrics]
    for d, m in paper_cols:
      published = row["paper"].get(d, {}).get(m)
      cells.append(f"{published:.1f}" if published is not None and dataset == d else DASH)
    cells.append(f"`{row['protocol']}`")
    lines.append("| " + " | ".join(cells) + " |")
  if paper_cols and dataset not in PAPER_DATASETS:
    lines += ["", f"The paper's numbers ({', '.join(paper_sets)}) are not comparable with "
              f"{dataset} and are shown as {DASH}; they are in table_{table['table']}.json."]
  return "\n".join(lines) + "\n"


def plot_table(table: Mapping[str, Any], path: str) -> None:
  """Bars (mean over seeds, error bars ± std) with the per-seed values as dots, one panel
  per metric, saved as a small PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metrics = table["metrics"]
  names = [r["name"] for r in table["rows"]]
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 + 1.1 * len(names) * len(metrics),
                                                     3.6), squeeze=False)
  for ax, m in zip(axes[0], metrics):
    means = np.array([100 * r["mean"][m] for r in table["rows"]])
    stds = np.array([100 * r["std"][m] for r in table["rows"]])
    stds = np.where(np.isnan(stds), 0.0, stds)
    x = np.arange(len(names))
    ax.bar(x, np.nan_to_num(means), yerr=stds, capsize=4, color="#56B4E9",
           edgecolor="black", linewidth=0.5)
    for i, r in enumerate(table["rows"]):
      pts = [100 * p for p in r["values"][m] if not math.isnan(p)]
      ax.plot([i] * len(pts), pts, "k.", markersize=4)
    finite = [100 * p for r in table["rows"] for p in r["values"][m] if not math.isnan(p)]
    if finite:  # zoom in on the values: the differences are what the table is about
      lo, hi = min(finite), max(finite)
      pad = max(1.0, 0.25 * (hi - lo))
      ax.set_ylim(max(0.0, lo - 3 * pad), min(100.0, hi + pad))
    ax.set_xticks(x)
    ax.set_xticklabels([_wrap(n) for n in names], fontsize=7, rotation=20, ha="right")
    ax.set_ylabel(f"{METRIC_LABELS.get(m, m)} (%)")
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle(f"{table['title']}\n{table['dataset']}, mean ± std over "
               f"{len(table['seeds'])} seed(s)", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _wrap(text: str, width: int = 18) -> str:
  words, lines, line = text.split(), [], ""
  for w in words:
    if line and len(line) + 1 + len(w) > width:
      lines.append(line)
      line = w
    else:
      line = f"{line} {w}".strip()
  return "\n".join(lines + [line])


def write_table(table: Mapping[str, Any], out_dir: str) -> dict[str, str]:
  """Writes table_<t>.md, table_<t>.json and table_<t>.png; returns their paths."""
  from rma_jax import report
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"table_{table['table']}")
  paths = {"md": stem + ".md", "json": stem + ".json", "png": stem + ".png"}
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(table_markdown(table))
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(report.to_jsonable(table), f, indent=2, allow_nan=False)
    f.write("\n")
  plot_table(table, paths["png"])
  return paths


def recall_rows(per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]]
                ) -> list[dict[str, Any]]:
  """Attention recall per attention run: its regions and the fixed anchor boxes (same K),
  per seed."""
  rows = []
  runs = sorted({r for res in per_seed.values() for r in res})
  for run in runs:
    model, fixed = [], []
    for s in sorted(per_seed):
      rec = per_seed[s].get(run, {}).get("attention_recall")
      if rec:
        model.append(float(rec["model_regions"]))
        fixed.append(float(rec["fixed_anchor_boxes"]))
    if model:
      rows.append({"run": run, "model_regions": model, "fixed_anchor_boxes": fixed})
  return rows


def plot_attention_recall(rows: Sequence[Mapping[str, Any]], path: str, title: str) -> None:
  """Grouped bars: attention recall of each run's regions beside K fixed anchor boxes."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(1.0 + 1.2 * len(rows), 3.4))
  x = np.arange(len(rows))
  for offset, key, colour, label in ((-0.2, "model_regions", "#E69F00", "the run's K regions"),
                                     (0.2, "fixed_anchor_boxes", "#999999",
                                      "K fixed anchor boxes")):
    means = [100 * mean_std(r[key])[0] for r in rows]
    stds = [100 * np.nan_to_num(mean_std(r[key])[1]) for r in rows]
    ax.bar(x + offset, means, 0.4, yerr=stds, capsize=3, color=colour, edgecolor="black",
           linewidth=0.5, label=label)
  ax.set_xticks(x)
  ax.set_xticklabels([r["run"] for r in rows], fontsize=7, rotation=25, ha="right")
  ax.set_ylabel("attention recall (%)")
  ax.set_ylim(0, 105)
  ax.legend(fontsize=7, loc="lower right")
  ax.set_title(title, fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def gather_results(base: ml_collections.ConfigDict, workdir: str, runs: Sequence[str],
                   seeds: Sequence[int]) -> dict[int, dict[str, Any]]:
  """seed -> run -> results, for the finished runs found under ``workdir``."""
  out: dict[int, dict[str, Any]] = {}
  for s in seeds:
    for run in runs:
      run_dir = os.path.join(workdir, f"seed{s}", run)
      if os.path.exists(_report_path(run_dir)):
        out.setdefault(s, {})[run] = load_results(run_dir)
  return out


def write_tables(base: ml_collections.ConfigDict, workdir: str, tables: Sequence[Any],
                 seeds: Sequence[int]) -> dict[Any, dict[str, Any]]:
  """Writes every table whose runs are finished for all of ``seeds`` (plus the attention
  recall figure and summary.md) from the reports under ``workdir``."""
  written = {}
  every_run = needed_runs(ablations.table_keys())
  found = gather_results(base, workdir, every_run, seeds)
  for t in tables:
    need = {v.run for v in ablations.TABLES[t]}
    complete = [s for s in seeds if need <= set(found.get(s, {}))]
    if not complete:
      logging.info("table %s: no seed has all its runs yet", t)
      continue
    table = collect_table(base, t, {s: found[s] for s in complete})
    paths = write_table(table, workdir)
    logging.info("table %s (%d seeds) written: %s", t, len(complete), paths["md"])
    written[t] = table
  rows = recall_rows(found)
  if rows:
    plot_attention_recall(rows, os.path.join(workdir, "attention_recall.png"),
                          f"Attention recall on {base.data.name} (test split, single view)")
  with open(os.path.join(workdir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(f"# Ablations on {base.data.name}\n\n")
    for t in ablations.table_keys():
      path = os.path.join(workdir, f"table_{t}.md")
      if os.path.exists(path):
        with open(path, encoding="utf-8") as g:
          f.write(g.read() + f"\n![table {t}](table_{t}.png)\n\n")
    if rows:
      f.write("![attention recall](attention_recall.png)\n")
  return written


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from absl import app
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  import jax
  if FLAGS.compilation_cache:
    # Seeds (and runs with the same architecture and loss) compile identical programs:
    # XLA's persistent cache turns every compile after the first into a file read.
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.info("JAX devices: %s", jax.devices())
  base = FLAGS.config
  tables = ablations.parse_table(FLAGS.table)
  seeds = list(range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.seeds))
  if FLAGS.write_only:
    write_tables(base, FLAGS.workdir, tables, seeds)
    return
  if FLAGS.seeds < 1:
    raise app.UsageError("--seeds must be >= 1")
  run_experiments(base, FLAGS.workdir, tables, seeds, share_stage1=FLAGS.share_stage1)


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Folder of the runs and tables.")
  flags.DEFINE_string("table", "all", "3, 4, 5, 6, loss, K, a comma list, or all.")
  flags.DEFINE_integer("seeds", 3, "Number of seeds (first_seed, first_seed + 1, ...).")
  flags.DEFINE_integer("first_seed", 0, "The first seed.")
  flags.DEFINE_bool("share_stage1", False, "Train stage 1 once for all seeds (the seed "
                    "spread then covers stage 2 only).")
  flags.DEFINE_string("compilation_cache", "", "A folder for JAX's persistent compilation "
                      "cache (shared by the seeds' identical programs); '' = off.")
  flags.DEFINE_bool("write_only", False, "Only (re)write the tables from finished runs.")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app as _app
  _define_flags()
  _app.run(main)
