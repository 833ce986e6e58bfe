"""What a run works out once, before its first stage: ``RunContext``.

A run (``run.train_and_evaluate``: both stages and the evaluation; or ``train.train``; or
``evaluate.evaluate_and_report`` on its own) checks its config once (``rma_jax.main`` or the
entry point), holds its workdir once (``workdir.hold``), and opens its data once
(``open_run``): the splits, checked, and the class list, which every stage and the report
share. A workdir keeps the class list of its first run (``WORKDIR/classes.json``, and
``WORKDIR/stage1/classes.json`` for stage 1), so a resumed or evaluated run scores the
classes it was trained on.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
from jax.sharding import Mesh
import ml_collections

from rma_jax import config_checks, errors, parallel
from rma_jax import data as data_lib


@dataclasses.dataclass(frozen=True)
class RunContext:
  """The checked config's data splits and class list, and the device mesh, of one run.

  Attributes:
    sources: the train / val / test splits (``data.Sources``).
    mesh: every device of every host on one ``data`` axis.
  """
  sources: data_lib.Sources
  mesh: Mesh

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.sources.class_names)

  def record_classes(self, workdir: str, dataset: str) -> None:
    """Writes ``WORKDIR/classes.json`` unless it is there (process 0 only)."""
    if jax.process_index() == 0 and data_lib.load_run_classes(workdir) is None:
      data_lib.save_run_classes(workdir, self.class_names, origin=self.sources.class_origin,
                                dataset=dataset)


def recorded_classes(workdirs: Sequence[str]) -> tuple[tuple[str, ...] | None, str]:
  """The class list recorded in the first of ``workdirs`` that has one, and its file; (None,
  '') when none has."""
  for workdir in workdirs:
    names = data_lib.load_run_classes(workdir)
    if names is not None:
      return names, os.path.join(workdir, data_lib.RUN_CLASSES_FILE)
  return None, ""


def trained_class_names(config: ml_collections.ConfigDict, workdir: str | None
                        ) -> tuple[str, ...]:
  """The class names of a trained run, in its model's order, without reading any data: from
  ``WORKDIR/classes.json`` (written by training); for a workdir without it (older runs, or
  none given), the fixed list of ``config.data.name`` (voc2007, coco2014, demo)."""
  names, _ = recorded_classes([workdir] if workdir else [])
  if names is not None:
    return names
  if config.data.name not in data_lib.BUILTIN_CLASSES:
    raise errors.ConfigError(f"no class list: {workdir or 'no workdir'} has no "
                     f"{data_lib.RUN_CLASSES_FILE} and data.name={config.data.name!r} has no "
                     "fixed class list; point --workdir at the trained run")
  return tuple(data_lib.BUILTIN_CLASSES[config.data.name])


def open_run(config: ml_collections.ConfigDict, workdirs: Sequence[str], *,
             check: bool = True) -> RunContext:
  """Opens the data of a run whose checkpoints are (or will be) in ``workdirs``.

  Args:
    config: a checked config (``config_checks.validate_config``).
    workdirs: the run's folders, the final one first (e.g. WORKDIR, WORKDIR/stage1): the
      class list is the one the first of them recorded, else the data's own.
    check: refuse splits a training run cannot use (``config_checks.check_sources``).
  """
  names, origin = recorded_classes(workdirs)
  sources = data_lib.get_sources(config.data, seed=config.seed, class_names=names,
                                 class_origin=f"{origin} (this workdir's run)" if origin else "")
  if check:
    config_checks.check_sources(config, sources)
  return RunContext(sources=sources, mesh=parallel.make_mesh())
