"""How a run's parameters start, and the parameter-tree surgery that copies weights in.

**The initialisation order**, written once (``initial_state``; first that applies wins):

1. ``WORKDIR/checkpoints/latest`` holds a step: **resume** it, parameters, optimizer state
   and step. A damaged step is set aside and the newest step that restores is used
   (``checkpointing.restore_newest``); a checkpoint of another model is an error that lists
   what changed since the last start.
2. ``config.init.from_checkpoint`` (a stage-1 workdir, paper §5.1 "two-step"): the trunk
   from its best checkpoint (RMA: ``init_rma_from_baseline``; the baseline: its trunk).
   With ``config.init.pretrained`` too, the ImageNet weights are applied first, so ``W_fx``
   starts from ImageNet ``fc6`` and the trunk is then replaced by stage 1's.
3. ``config.init.pretrained`` (``python -m rma_jax.pretrained``): the trunk, and ``fc6`` as
   ``W_fx`` where the shapes are the paper's, from ImageNet weights
   (``init_trunk_from_pretrained``).
4. **From scratch**: the model's own initialisation (He or Dirac trunk, Xavier elsewhere).

In 2-4 every layer not named keeps its fresh (Xavier) initialisation, the optimizer state
starts empty and the moving average of the parameters (``optim.ema_decay > 0``) starts at
them; a resume from a checkpoint without an average starts it at the restored parameters
(``checkpointing.restore_newest``). The surgery functions are pure functions on parameter
trees.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from absl import logging
import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from rma_jax import checkpointing, errors, models, optimizer, parallel, steps
from rma_jax import workdir as workdir_lib
from rma_jax.weights import WeightsMismatchError, load_pretrained


def initial_state(config: ml_collections.ConfigDict, state: steps.TrainState,
                  tx: optax.GradientTransformation, mesh: Mesh,
                  latest: ocp.CheckpointManager, changes: dict[str, tuple[Any, Any]]
                  ) -> tuple[steps.TrainState, bool]:
  """The state a run starts from, in the order of the module docstring.

  Args:
    config: the run's config.
    state: the freshly initialised state (``steps.create_train_state``), replicated.
    tx: its optimizer.
    mesh: the device mesh.
    latest: the run's ``checkpointing.latest_manager``.
    changes: the config changes since the last recorded start (``workdir.check_config``),
      named in the error when the checkpoint holds another model.

  Returns:
    (state, whether it was resumed from ``latest``).
  """
  try:
    restored = checkpointing.restore_newest(latest, state, check=_nonfinite_reason)
  except checkpointing.CheckpointMismatchError as e:
    if not changes:
      raise
    raise checkpointing.CheckpointMismatchError(
        f"{e}. Changed since the last start: {workdir_lib.describe_changes(changes)}"
    ) from None
  if restored is not None:
    state, _ = restored
    logging.info("Resumed from %s at step %d", latest.directory, int(state.step))
    return state, True
  params, note = initial_params(config, jax.device_get(state.params))
  params = jax.device_put(params, parallel.replicated(mesh))
  state = state.replace(params=params, opt_state=jax.jit(
      tx.init, out_shardings=parallel.replicated(mesh))(params))
  if state.ema_params is not None:  # the average starts at the initial parameters
    state = state.replace(ema_params=optimizer.copy_tree(params))
  logging.info("Initialised %s", note)
  return state, False


def initial_params(config: ml_collections.ConfigDict, params: Any) -> tuple[Any, str]:
  """Steps 2-4 of the initialisation order on freshly initialised (host) ``params``.

  Returns:
    (the parameters, a note for the log saying what was done).
  """
  init = config.init
  if init.from_checkpoint:
    _check_pixel_convention(init.from_checkpoint, config.data.pixel_convention)
    note = ""
    if init.pretrained:
      params = _from_imagenet(config, params)
      note = f", after ImageNet weights {init.pretrained} (fc6 -> W_fx)"
    stage1 = checkpointing.load_selected_params(init.from_checkpoint)
    if config.model.name == "rma":
      params = init_rma_from_baseline(params, stage1.params)
    else:
      params = init_trunk_from_pretrained(params, stage1.params, width=config.model.width)
    note = (f"trunk from stage-1 checkpoint {init.from_checkpoint} (step {stage1.step}"
            f"{', its moving average' if stage1.ema else ''}){note}")
  elif init.pretrained:
    params = _from_imagenet(config, params)
    note = f"trunk from ImageNet weights {init.pretrained}"
  else:
    if config.model.trunk != "vgg16" and config.model.get("bn", "frozen") == "frozen":
      raise errors.ConfigError(
          "model.bn='frozen' keeps the batch-norm statistics as loaded, but this "
          f"{config.model.trunk} starts from scratch: set init.pretrained (python -m "
          "rma_jax.pretrained) or model.bn='finetune'")
    note = f"from scratch ({_scratch_init_note(config)})"
  return params, note


def _from_imagenet(config: ml_collections.ConfigDict, params: Any) -> Any:
  imagenet, _ = load_pretrained(config.init.pretrained,
                                pixel_convention=config.data.pixel_convention,
                                trunk=config.model.trunk)
  return init_trunk_from_pretrained(params, imagenet, width=config.model.width)


def _nonfinite_reason(state: steps.TrainState) -> str | None:
  n = int(jax.jit(steps.count_nonfinite)(steps.saved_arrays(state)))
  return f"it holds {n} non-finite values" if n else None


def _scratch_init_note(config: ml_collections.ConfigDict) -> str:
  """What a from-scratch initialisation does, for the log."""
  if config.model.trunk == "vgg16" and config.model.get("trunk_init", "he") == "dirac":
    trunk = ("trunk convs Dirac: identity + 0.1 x He normal where C_in = C_out, He normal "
             "where the channel count changes")
  else:
    trunk = "trunk convs He normal"
  return trunk + "; other layers Xavier uniform (W_zm x model.theta_kernel_scale)"


def _check_pixel_convention(workdir: str, convention: str) -> None:
  """A trunk must be fed pixels the way it was trained: compare with the run's config."""
  recorded = workdir_lib.recorded_config(workdir)
  if recorded is None:
    return
  trained = recorded.get("data", {}).get("pixel_convention")
  if trained and trained != convention:
    raise errors.ConfigError(f"{workdir} was trained with data.pixel_convention={trained!r}, "
                             f"this run uses {convention!r}; set them equal")


# --------------------------------------------------------------------------- tree surgery


def _unwrap(tree: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
  """Accepts ``params`` or ``{'params': params}``; returns (params, was_wrapped)."""
  if set(tree) == {"params"}:
    return tree["params"], True
  return tree, False


def _like(value: Any, old: Any) -> Any:
  """``value`` with the dtype (and, for a jax.Array, the sharding) of ``old``."""
  new = np.asarray(value, dtype=old.dtype if hasattr(old, "dtype") else np.asarray(old).dtype)
  if isinstance(old, jax.Array):
    return jax.device_put(new, old.sharding)
  return new


def _replace(tree: Mapping[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
  """A copy of ``tree`` with ``tree[path]`` = value; shares every untouched subtree."""
  new = dict(tree)
  new[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
  return new


def _fit(name: str, src: Any, old: Any, width: int, errors: list[str]) -> Any:
  """``src`` as a replacement of ``old``; the leading channels when ``width`` > 1 thins it."""
  src_shape, old_shape = tuple(np.shape(src)), tuple(np.shape(old))
  if src_shape == old_shape:
    return _like(src, old)
  if width > 1 and len(src_shape) == len(old_shape) and all(
      o <= s for o, s in zip(old_shape, src_shape)):
    # Thin trunks (width > 1, smoke tests only) take the leading input/output channels.
    return _like(np.asarray(src)[tuple(slice(0, o) for o in old_shape)], old)
  errors.append(f"{name}: pretrained {src_shape} vs model {old_shape}")
  return old


def _leaf_paths(tree: Any) -> list[tuple[str, ...]]:
  """The paths of a nested dict's leaves (a VGG layer's ``(kernel,)``, a ResNet block's
  ``(conv1, kernel)``, …)."""
  if not isinstance(tree, Mapping):
    return [()]
  return [(k,) + rest for k, v in tree.items() for rest in _leaf_paths(v)]


def _get(tree: Any, path: Sequence[str]) -> Any:
  """``tree[path[0]][path[1]]…``, or None where a key is missing."""
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _copy_layers(params: Mapping[str, Any], prefix: tuple[str, ...],
                 source: Mapping[str, Any], names: Sequence[str], width: int,
                 what: str) -> dict[str, Any]:
  errors = []
  target = params
  for path in prefix:
    target = target[path]
  for name in names:
    if name not in source:
      errors.append(f"{name}: missing from the {what}")
      continue
    for leaf in _leaf_paths(target.get(name) or {"kernel": 0, "bias": 0}):
      full = "/".join(prefix + (name, *leaf))
      src, old = _get(source[name], leaf), _get(target.get(name), leaf)
      if src is None or old is None:
        errors.append(f"{full}: missing")
        continue
      params = _replace(params, prefix + (name, *leaf), _fit(full, src, old, width, errors))
  if errors:
    raise WeightsMismatchError(f"cannot initialise from the {what}:\n  " + "\n  ".join(errors))
  return dict(params)


def init_trunk_from_pretrained(params: Mapping[str, Any], pretrained_params: Mapping[str, Any],
                               *, width: int = 1) -> dict[str, Any]:
  """Copies ImageNet (or stage-1) trunk weights into a baseline or RMA parameter tree: every
  layer of the model's trunk (VGG-16's ``conv1_1 … conv5_3``; a ResNet's ``conv1``, ``bn1``,
  ``layer1_0`` …, batch-norm statistics included).

  The RMA's ``attention/cell/fc6`` (``W_fx``) is also copied from ``fc6`` when the shapes
  match (VGG-16, width 1, S = 7, x_dim = 4096) and left as initialised otherwise (logged).

  Args:
    params: a baseline tree (the trunk's layers at the top, maybe ``head``) or an ``RMA``
      tree (``trunk/…``, ``attention/…``), bare or as ``{'params': …}``.
    pretrained_params: ``{'conv1_1': …, 'conv5_3': …, ['fc6', 'fc7']}`` (``load_pretrained``;
      a ResNet's layers), or another baseline/RMA tree (e.g. a stage-1 baseline).
    width: the model's channel divisor. With width > 1, pretrained kernels wider than the
      model are cut to their leading channels: a cheap stand-in for smoke tests, not a
      faithful network.

  Returns:
    A new tree like ``params`` (inputs are not modified) with the trunk replaced; dtypes and
    jax.Array shardings follow ``params``.

  Raises:
    WeightsMismatchError: naming every missing layer and every shape that does not fit.
  """
  tree, wrapped = _unwrap(params)
  source, _ = _unwrap(pretrained_params)
  source_trunk, _ = models.trunk_params(source)
  trunk, prefix = models.trunk_params(tree)
  new = _copy_layers(tree, prefix, source_trunk, sorted(trunk), width,
                     "pretrained parameters")
  cell = new.get("attention", {}).get("cell", {})
  if "fc6" in cell and "fc6" in source:
    fc6 = source["fc6"]
    if all(np.shape(fc6[k]) == np.shape(cell["fc6"][k]) for k in ("kernel", "bias")):
      new = _copy_layers(new, ("attention", "cell"), source, ["fc6"], 1, "pretrained fc6")
    else:
      logging.warning("W_fx (attention/cell/fc6 %s) keeps its fresh init: pretrained fc6 is %s",
                      np.shape(cell["fc6"]["kernel"]), np.shape(fc6["kernel"]))
  return {"params": new} if wrapped else new


def init_rma_from_baseline(rma_params: Mapping[str, Any],
                           baseline_params: Mapping[str, Any]) -> dict[str, Any]:
  """Stage 2 of the paper's two-step initialisation (§5.1): the attention model's trunk from
  the stage-1 baseline's.

  Args:
    rma_params: a freshly initialised ``RMA`` tree (bare or ``{'params': …}``); its
      attention layers (``W_fx``, the LSTM, ``W_hz``, ``W_zs``, ``W_zm``) are kept.
    baseline_params: the stage-1 ``Baseline`` tree (its ``head`` is not used), or any tree
      with the same trunk at the top or under ``trunk``.

  Returns:
    A new RMA tree: every layer of its trunk from stage 1, the rest unchanged.

  Raises:
    WeightsMismatchError: naming every missing or mismatching tensor.
  """
  tree, wrapped = _unwrap(rma_params)
  if "trunk" not in tree or "attention" not in tree:
    raise ValueError(f"rma_params is not an RMA tree (top-level keys {sorted(tree)})")
  source, _ = _unwrap(baseline_params)
  source_trunk, _ = models.trunk_params(source)
  new = _copy_layers(tree, ("trunk",), source_trunk, sorted(tree["trunk"]), 1,
                     "stage-1 parameters")
  return {"params": new} if wrapped else new
