r"""The paper's multi-scale fusion (§5.1): average the ten-view scores of separately trained
models (one trained at N = 512, one at N = 640) and report the fused numbers.

    python -m rma_jax.main --mode=fuse --fuse_workdirs=runs/voc512,runs/voc640 --workdir=runs/fused
    python -m rma_jax.fuse --workdirs=runs/voc512,runs/voc640 --out=runs/fused

Each input is a workdir that has been evaluated (``--mode=train`` ends with the evaluation,
``--mode=evaluate`` runs it): ``WORKDIR/report/scores.npz`` holds the raw per-image scores
and the test images' ids of every protocol, ``WORKDIR/report/report.json`` names the
headline protocol and how its metrics were computed. For each input the headline protocol
is fused (the ten-view one behind an SVM headline; it is ``ten_view@N``, or
``ten_view@N1+N2`` with ``eval.scales``). The raw scores are averaged over the inputs and
the inputs' ``score_transform`` is applied to the mean, exactly as ``eval.scales`` fuses the
scales of one checkpoint (which stays the option for one model at several input sizes).

Every input must have scored the same images (the same ids; the order may differ) with
the same classes and the same metric settings. Each input's scores are those of the
parameters its evaluation selected (``checkpointing.load_selected_params``: the moving average
of the parameters where it won the validation); the report says which for each.
``OUT/report/`` gets ``report.json`` and ``report.md`` (the fused row beside each input's
row, recomputed from its scores, and the paper's Table 6 numbers, 91.9 for two scales on VOC
2007) and ``scores.npz`` (the fused scores, under the protocol name ``fused``, so a fused
folder can itself be an input).
Nothing here imports TensorFlow.

Refused with a ``FuseError`` (a ``UserError``: one line, exit status 2 on the command line),
before anything is written: a run given twice (the same folder under two spellings, through
a link, or a copy of it: identical scores), an output folder that is one of the inputs or
inside one, or whose ``report/`` is or holds one (the fusion would overwrite that run's
report), and an input whose ``report.json`` or ``scores.npz`` is damaged (re-run
``--mode=evaluate`` on it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import posixpath
import sys
import zipfile
import zlib
from typing import Any, Sequence

from absl import logging
import numpy as np

from rma_jax import errors, evaluate, paper, paths, report
from rma_jax.data.classes import paper_dataset
from rma_jax.metric_card import metric_card, parameters_text

FUSED = "fused"
# Metric settings every input must share (recorded by rma_jax.metrics for each protocol).
_SETTINGS = ("score_transform", "prf_score_transform", "ap_mode", "top_k", "threshold")


class FuseError(errors.UserError, ValueError):
  """A fusion refused for a reason the user can fix; the message names the folder or file."""


@dataclasses.dataclass
class Evaluated:
  """One evaluated workdir: the fused protocol's per-image arrays and its report."""
  workdir: str
  protocol: str
  scores: np.ndarray  # (N, C) raw scores
  labels: np.ndarray  # (N, C)
  difficult: np.ndarray  # (N, C) bool
  ids: np.ndarray  # (N,) str
  results: dict[str, Any]  # report.json's "results"
  dataset: str


def _headline_scores_protocol(results: dict[str, Any]) -> Any:
  headline = results.get("headline")
  if headline == "svm":  # SVM decision values are not scores to average: its features' protocol
    svm = results.get("svm")
    headline = svm.get("features_of") if isinstance(svm, dict) else None
  return headline


def _damaged(path: str, workdir: str, what: str) -> FuseError:
  return FuseError(f"{path} is damaged ({what}); re-run --mode=evaluate on {workdir} to "
                   f"write it again (python -m rma_jax.main --config=... --workdir={workdir} "
                   "--mode=evaluate)")


# What reading a damaged .npz from an open file raises: a cut or garbled zip (BadZipFile,
# zlib.error, EOFError, OSError for a seek to a garbled offset), bytes that are no archive
# (numpy's ValueError about pickled data), a garbled array header (ValueError).
_NPZ_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)
_NOT_DAMAGE = (ConnectionError, TimeoutError, PermissionError)  # a bucket's read failing


def load_evaluated(workdir: str) -> Evaluated:
  """Reads ``workdir/report/{report.json, scores.npz}``; a ``FileNotFoundError`` when one is
  missing, a ``FuseError`` naming the file when it is damaged."""
  report_dir = os.path.join(workdir, "report")
  json_path, npz_path = (os.path.join(report_dir, f) for f in ("report.json", "scores.npz"))
  for path in (json_path, npz_path):
    if not paths.path(path).exists():
      raise FileNotFoundError(
          f"{workdir}: no {os.path.relpath(path, workdir)}; evaluate the run first "
          f"(python -m rma_jax.main --config=... --workdir={workdir} --mode=evaluate)")
  try:
    payload = json.loads(paths.path(json_path).read_text(encoding="utf-8"))
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
    raise _damaged(json_path, workdir, f"not valid JSON: {e}") from e
  results = payload.get("results") if isinstance(payload, dict) else None
  if not isinstance(results, dict) or not isinstance(results.get("protocols"), dict):
    raise _damaged(json_path, workdir, "no evaluation results in it")
  protocol = _headline_scores_protocol(results)
  if not isinstance(protocol, str) or not isinstance(results["protocols"].get(protocol), dict):
    raise _damaged(json_path, workdir, f"no metrics of its headline protocol {protocol!r}")
  with paths.path(npz_path).open("rb") as f:
    try:
      npz = np.load(f, allow_pickle=False)
      if not isinstance(npz, np.lib.npyio.NpzFile):
        raise _damaged(npz_path, workdir, "a single array, not an .npz archive")
      with npz:
        keys = set(npz.files)
        arrays = {k: npz[f"{protocol}/{k}"] for k in ("scores", "labels", "difficult", "id")
                  if f"{protocol}/{k}" in keys}
    except (FuseError, *_NOT_DAMAGE):
      raise
    except _NPZ_DAMAGE as e:
      raise _damaged(npz_path, workdir, "not a readable .npz archive") from e
  if "scores" not in arrays:
    raise FuseError(f"{npz_path} has no scores of the headline protocol {protocol!r} "
                    f"(it has {sorted({k.split('/')[0] for k in keys})}); re-run "
                    f"--mode=evaluate on {workdir}")
  if "id" not in arrays:
    raise FuseError(f"{npz_path} has no test-image ids (written by an older version); "
                    f"re-run --mode=evaluate on {workdir} to write them")
  missing = sorted({"labels", "difficult"} - set(arrays))
  if missing:
    raise _damaged(npz_path, workdir, f"no {' or '.join(missing)} of {protocol!r}")
  return Evaluated(workdir=workdir, protocol=protocol, scores=arrays["scores"],
                   labels=arrays["labels"], difficult=arrays["difficult"].astype(bool),
                   ids=arrays["id"].astype(str), results=results,
                   dataset=str(payload.get("dataset", results.get("data", ""))))


def _align(reference: Evaluated, other: Evaluated) -> Evaluated:
  """``other`` with its rows in the order of ``reference``'s ids, or a ValueError that names
  both workdirs and a few of the ids that differ."""
  if np.array_equal(reference.ids, other.ids):
    return other
  ref_set, other_set = set(reference.ids.tolist()), set(other.ids.tolist())
  if ref_set != other_set or len(ref_set) != len(reference.ids) or len(other_set) != len(
      other.ids):
    only_ref = sorted(ref_set - other_set)
    only_other = sorted(other_set - ref_set)
    parts = [f"{reference.workdir} scored {len(reference.ids)} images and {other.workdir} "
             f"{len(other.ids)}"]
    if only_ref:
      parts.append(f"{len(only_ref)} ids only in {reference.workdir} (e.g. {only_ref[:5]})")
    if only_other:
      parts.append(f"{len(only_other)} ids only in {other.workdir} (e.g. {only_other[:5]})")
    if not (only_ref or only_other):
      parts.append("some ids occur more than once")
    raise FuseError("cannot fuse runs evaluated on different images: " + "; ".join(parts) +
                     ". Evaluate every run on the same split.")
  row = {i: r for r, i in enumerate(other.ids.tolist())}
  order = np.asarray([row[i] for i in reference.ids.tolist()])
  return dataclasses.replace(other, scores=other.scores[order], labels=other.labels[order],
                             difficult=other.difficult[order], ids=other.ids[order])


def _check_compatible(runs: Sequence[Evaluated]) -> dict[str, Any]:
  """The shared metric settings of the runs' fused protocols; ValueError on a mismatch."""
  first = runs[0]
  settings = {k: first.results["protocols"][first.protocol].get(k) for k in _SETTINGS}
  for run in runs[1:]:
    if run.results.get("class_names") != first.results.get("class_names"):
      raise FuseError(f"{first.workdir} and {run.workdir} have different classes")
    if run.dataset != first.dataset:
      raise FuseError(f"{first.workdir} is {first.dataset!r} and {run.workdir} "
                       f"{run.dataset!r}: fuse runs of one data set")
    theirs = run.results["protocols"][run.protocol]
    for key, value in settings.items():
      if theirs.get(key) != value:
        raise FuseError(f"{first.workdir} and {run.workdir} were evaluated with different "
                         f"{key} ({value!r} vs {theirs.get(key)!r}); evaluate them with the "
                         f"same eval.* settings")
    if not (np.array_equal(run.labels, first.labels)
            and np.array_equal(run.difficult, first.difficult)):
      raise FuseError(f"{first.workdir} and {run.workdir} scored the same image ids with "
                       "different labels: they were not evaluated on the same data")
  return settings


def _resolved(path: str) -> str:
  """Where ``path`` is: a local path with ``~``, links, ``.``, ``..`` and a trailing separator
  resolved (``os.path.realpath``); a URL normalised (``gs://b//x/./y/`` -> ``gs://b/x/y``)."""
  path = os.fspath(path)
  if paths.is_remote(path):
    scheme, rest = path.split("://", 1)
    return f"{scheme.lower()}://{posixpath.normpath(rest).strip('/')}"
  return os.path.realpath(os.path.expanduser(path))


def _inside(path: str, folder: str) -> bool:
  """Whether resolved ``path`` is ``folder`` or under it (both from ``_resolved``)."""
  sep = "/" if paths.is_remote(folder) else os.sep
  return path == folder or path.startswith(folder.rstrip(sep) + sep)


def _same_folder(a: str, b: str) -> bool:
  if _resolved(a) == _resolved(b):
    return True
  try:  # local folders reached by different paths (a bind mount)
    return not paths.is_remote(a) and not paths.is_remote(b) and os.path.samefile(
        os.path.expanduser(a), os.path.expanduser(b))
  except OSError:
    return False


def _refuse_repeated(workdirs: Sequence[str]) -> None:
  """A ``FuseError`` naming both spellings when two of ``workdirs`` are one folder."""
  for i, a in enumerate(workdirs):
    for b in workdirs[i + 1:]:
      if _same_folder(a, b):
        raise FuseError(f"fuse: {a} and {b} are the same workdir ({_resolved(a)}); fusing a "
                        "run with itself reports its own numbers as two runs': give each "
                        "run once in --fuse_workdirs")


def _refuse_output_over_inputs(workdirs: Sequence[str], out_dir: str) -> None:
  """A ``FuseError`` when writing ``out_dir/report/`` would write into an input: ``out_dir``
  is an input or inside one, or its ``report/`` is (a link into) an input or holds one."""
  out = _resolved(out_dir)
  report_dir = _resolved(os.path.join(out_dir, "report"))
  for w in workdirs:
    r = _resolved(w)
    if out == r:
      why = f"is the input {w}"
    elif _inside(out, r):
      why = f"is inside the input {w}"
    elif _inside(report_dir, r):
      why = f"has its report/ ({report_dir}) inside the input {w}"
    elif _inside(r, report_dir):
      why = f"would have the input {w} in its report/ folder ({report_dir})"
    else:
      continue
    raise FuseError(f"fuse: the output folder {out_dir} {why}; the fusion would overwrite "
                    "that run's files: give a --workdir (--out) of its own, outside the inputs")


def _refuse_identical(runs: Sequence[Evaluated]) -> None:
  """A ``FuseError`` when two runs have the same scores (aligned by id): one run copied, or
  evaluated twice."""
  for i, a in enumerate(runs):
    for b in runs[i + 1:]:
      if np.array_equal(a.scores, b.scores):
        protocols = a.protocol if a.protocol == b.protocol else f"{a.protocol} / {b.protocol}"
        raise FuseError(f"fuse: {a.workdir} and {b.workdir} are the same run (identical "
                        f"{protocols} scores of all {len(a.ids)} images: a copy, or one "
                        "checkpoint evaluated twice); give each run once in --fuse_workdirs")


def _scales(protocol: str) -> list[int]:
  """'ten_view@512+640' -> [512, 640]; [] without that pattern."""
  try:
    return [int(n) for n in protocol.split("@", 1)[1].split("+")]
  except (IndexError, ValueError):
    return []


def fuse_workdirs(workdirs: Sequence[str], out_dir: str) -> dict[str, Any]:
  """Fuses the evaluated ``workdirs`` into ``out_dir/report/``; returns the results dict.

  Args:
    workdirs: two or more evaluated run folders.
    out_dir: where ``report/`` is written (created if missing).

  Raises:
    FuseError: a run given twice or copied, ``out_dir`` writing into an input, a damaged
      report file (nothing is written).

  Returns:
    ``protocols`` (one metrics dict per input, named ``WORKDIR:PROTOCOL``, recomputed from its
    scores, and ``fused``), ``headline`` ('fused'), ``inputs`` and the shared settings.
  """
  workdirs = [w for w in workdirs if w]
  if len(workdirs) < 2:
    raise FuseError(f"fusion needs two or more evaluated workdirs, got {list(workdirs)}")
  _refuse_repeated(workdirs)
  _refuse_output_over_inputs(workdirs, out_dir)
  runs = [load_evaluated(w) for w in workdirs]
  runs = [runs[0]] + [_align(runs[0], r) for r in runs[1:]]
  _refuse_identical(runs)
  settings = _check_compatible(runs)
  first = runs[0]
  metric_args = dict(ap_mode=settings["ap_mode"], k=settings["top_k"] or None,
                     threshold=settings["threshold"], transform=settings["score_transform"],
                     prf=settings["prf_score_transform"])
  fused_scores = np.mean([r.scores.astype(np.float64) for r in runs], axis=0)

  protocols: dict[str, Any] = {}
  for r in runs:
    protocols[f"{r.workdir}:{r.protocol}"] = evaluate.compute_metrics(
        r.scores, r.labels, r.difficult, **metric_args)
  protocols[FUSED] = evaluate.compute_metrics(fused_scores, first.labels, first.difficult,
                                              **metric_args)
  published = paper.PAPER_TABLE6_MAP["two scales + ten-crop"]
  results: dict[str, Any] = {
      "workdir": paths.absolute(out_dir), "data": first.dataset,
      "split": first.results.get("split"), "class_names": first.results.get("class_names"),
      "num_images": int(first.labels.shape[0]),
      "inputs": [{"workdir": paths.absolute(r.workdir), "protocol": r.protocol,
                  "checkpoint": r.results.get("checkpoint"), "step": r.results.get("step"),
                  "ema": bool(r.results.get("ema"))}
                 for r in runs],
      **settings,
      "paper_table6_two_scales_ten_crop": dict(published),  # %, the paper's fused number
      "protocols": protocols, "headline": FUSED,
  }
  report_dir = os.path.join(out_dir, "report")
  paths.path(report_dir).mkdir(parents=True, exist_ok=True)
  with paths.path(os.path.join(report_dir, "scores.npz")).open("wb") as f:
    np.savez_compressed(f, **{
        f"{FUSED}/scores": fused_scores, f"{FUSED}/labels": first.labels,
        f"{FUSED}/difficult": first.difficult, f"{FUSED}/id": first.ids})
  scales = [n for r in runs for n in _scales(r.protocol)]
  ten = all(r.protocol.startswith("ten_view") for r in runs)
  h = protocols[FUSED]
  card = metric_card(
      dataset=f"{first.dataset} ({results['split']} split)", ap_mode=settings["ap_mode"],
      top_k=settings["top_k"] or None, threshold=settings["threshold"],
      score_transform=settings["score_transform"],
      prf_score_transform=settings["prf_score_transform"],
      views="ten-view" if ten else "single-view", scales=scales,
      num_images=h["num_images"], num_images_without_labels=h["num_images_without_labels"],
      notes=[f"fusion of {len(runs)} separately trained runs (paper §5.1): the mean of their "
             "raw scores of " + ", ".join(f"{r.protocol} ({r.workdir})" for r in runs) +
             ", then score_transform; each input's row is recomputed from its scores.npz",
             "the same images in every input, matched by id",
             "parameters scored, as each input's evaluation selected them: " + "; ".join(
                 f"{r.workdir}: {_parameters(r)}" for r in runs)])
  report.write_report(results, report_dir, class_names=results["class_names"],
                      dataset_name=first.dataset, card=card,
                      method_name=f"Fusion of {len(runs)} runs",
                      sections=_fusion_section(runs, protocols, first.dataset,
                                               settings["ap_mode"]))
  logging.info("fused %d runs (%s): mAP %.4f (%s), report in %s", len(runs),
               ", ".join(r.workdir for r in runs), h["mAP"], settings["ap_mode"], report_dir)
  return results


def _parameters(run: Evaluated) -> str:
  """Which parameters an input's evaluation scored (its report.json's ``ema``)."""
  return parameters_text(bool(run.results.get("ema")), bool(run.results.get("has_ema")),
                         str(run.results.get("checkpoint")))


def _fusion_section(runs: Sequence[Evaluated], protocols: dict[str, Any], dataset: str,
                    ap_mode: str) -> list[str]:
  """The fused row beside each input's row and the paper's Table 6 rows, as Markdown."""
  pct = report.pct
  lines = [f"## Fusion of {len(runs)} runs (paper §5.1), %", "",
           f"| Run | protocol | checkpoint | mAP ({ap_mode}) | mAP (all-point) | C-F1 | O-F1 |",
           "|---|---|---|---|---|---|---|"]

  def row(name, protocol, checkpoint, m):
    return (f"| {name} | {protocol} | {checkpoint} | {pct(m['mAP'])} | {pct(m['mAP_all'])} "
            f"| {pct(m['CF1'])} | {pct(m['OF1'])} |")

  for r in runs:
    ema = ", EMA" if r.results.get("ema") else ""
    lines.append(row(r.workdir, r.protocol,
                     f"{r.results.get('checkpoint')} (step {r.results.get('step')}{ema})",
                     protocols[f"{r.workdir}:{r.protocol}"]))
  lines.append(row("**fused**", "mean of the raw scores above", "", protocols[FUSED]))
  column = "coco2014" if paper_dataset(dataset) == "coco2014" else "voc2007"
  where = {"voc2007": "VOC 2007", "coco2014": "MS-COCO"}[column]
  if paper_dataset(dataset) != "voc2007" and column == "voc2007":
    where += ", not this data set"
  for setting in ("s=512 + ten-crop", "s=640 + ten-crop", "two scales + ten-crop"):
    lines.append(f"| Paper: {setting} ({where}) | | | "
                 f"{paper.PAPER_TABLE6_MAP[setting][column]:.1f} | | | |")
  return lines + [""]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdirs", required=True,
                      help="comma-separated evaluated workdirs (two or more)")
  parser.add_argument("--out", required=True, help="output folder (OUT/report/ is written)")
  args = parser.parse_args(argv)
  try:
    results = fuse_workdirs(args.workdirs.split(","), args.out)
  except (errors.UserError, FileNotFoundError) as e:  # as python -m rma_jax.main shows them
    print(f"error: {e}", file=sys.stderr, flush=True)
    return errors.EXIT_STATUS
  fused = results["protocols"][FUSED]
  print(f"fused {len(results['inputs'])} runs: mAP {100 * fused['mAP']:.1f} "
        f"({results['ap_mode']}); report in {os.path.join(args.out, 'report')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
