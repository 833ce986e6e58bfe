r"""``--mode=export``: a trained run as files another program serves (docs/export.md).

    python -m rma_jax.main --config=configs/demo.py --workdir=/tmp/rma_demo --mode=export \
        [--formats=stablehlo,onnx] [--out=DIR] [--overwrite]

From the run's best checkpoint (the one ``--mode=evaluate`` scores, with the parameters its
validation selected: the moving average where it won; ``trained.load_run``), in
``DIR`` (default ``WORKDIR/export``):

* ``single_view.stablehlo``, ``ten_view.stablehlo``: ``jax.export`` artifacts of
  ``trained.serving_outputs`` for the CPU, CUDA and TPU in one file each, the batch size
  symbolic. A function of ``(parameters, images)``: the parameters are the arrays of
  ``params.npz`` in the order ``export.json`` lists (one copy for both artifacts, and no
  weights inside a module), the images (B, S, S, 3) uint8 RGB resized to S x S (normalised
  inside). ``jax.export.deserialize`` runs them with ``jax`` alone.
* ``single_view.onnx``, ``ten_view.onnx`` (``--formats=onnx``, the ``.[export]`` extra):
  the same functions through jax2onnx, the weights inside, for ONNX Runtime and TensorRT.
  Traced from the plain model (XLA's convolutions: an ONNX graph has no platform choice) with
  the recurrence unrolled (K+1 steps; jax2onnx takes no ``nn.scan``), and a ResNet trunk's
  blocks too (``ResNet(unroll=True)``).
* ``export.json``, written last (a folder without it is not an export): the class names, the
  inputs (size, layout, how to resize), the normalisation, the outputs, the score transform,
  threshold and top-k of the report, the parameter order, the rma_jax and JAX versions, the
  config, and the SHA-256 of every file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import rma_jax
from rma_jax import build, errors, trained
from rma_jax import paths as paths_lib

FORMATS = ("stablehlo", "onnx")
PLATFORMS = ("cpu", "cuda", "tpu")
VIEWS = ("single_view", "ten_view")
MANIFEST = "export.json"
PARAMS_FILE = "params.npz"
FORMAT_VERSION = 1

RESIZE = ("bilinear to S x S, aspect ratio not kept (Pillow's Image.resize with "
          "Image.BILINEAR and reducing_gap=3.0, as rma_jax.data.preprocess.resize)")


class ExportError(errors.UserError):
  """An export refused for a reason the user can fix (the message says how)."""


def param_names(params: Any) -> list[str]:
  """'/'-joined names of the parameter arrays, in ``jax.tree_util`` leaf order (the order of
  the exported functions' first argument)."""
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in paths]


def _size(run: trained.TrainedRun, view: str) -> int:
  return run.ten_view_size if view == "ten_view" else run.input_size


def _serving_fn(run: trained.TrainedRun, view: str, model: Any = None) -> Callable:
  """``fn(variables, images) -> trained.serving_outputs(...)`` of ``view`` for ``model``
  (default the run's)."""
  return functools.partial(trained.serving_outputs, model or run.model,
                           score_transform=run.score_transform,
                           crop_size=run.input_size if view == "ten_view" else None)


def stablehlo(run: trained.TrainedRun, view: str, platforms: Sequence[str] = PLATFORMS
              ) -> jax.export.Exported:
  """``fn(leaves, images) -> trained.serving_outputs(...)`` exported for ``platforms``.

  ``leaves``: the parameter arrays in ``param_names`` order; ``images``: (B, S, S, 3)
  uint8 with B symbolic. The model's CPU kernels choose by shape, so with a symbolic batch
  its blocks are the plain model's on every platform (``rma_jax.kernels.cpu.modules``).
  """
  treedef = jax.tree_util.tree_structure(run.params)
  outputs = _serving_fn(run, view)

  def fn(leaves, images):
    return outputs({"params": jax.tree_util.tree_unflatten(treedef, leaves)}, images)

  (batch,) = jax.export.symbolic_shape("batch")
  size = _size(run, view)
  leaves = [jax.ShapeDtypeStruct(np.shape(x), x.dtype)
            for x in jax.tree_util.tree_leaves(run.params)]
  return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
      leaves, jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8))


def onnx_model(run: trained.TrainedRun, view: str) -> Any:
  """The ONNX model (``onnx.ModelProto``) of ``serving_outputs`` for ``view``, through
  jax2onnx: input ``images`` (batch, S, S, 3) uint8, the outputs named as in
  ``serving_outputs``, the weights inside."""
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(
        "--formats=onnx needs jax2onnx and onnxruntime: pip install -e '.[export]' "
        f"({e}); or export --formats=stablehlo alone") from e
  config = ml_collections.ConfigDict(run.config.to_dict())
  config.model.conv_impl = "xla"
  model = build.unrolled(build.build_model(config, len(run.class_names)))
  outputs, size = _serving_fn(run, view, model), _size(run, view)
  variables = {"params": run.params}
  names = sorted(_output_shapes(run, view))

  def ordered(images):
    out = outputs(variables, images)
    return tuple(out[n] for n in names)

  logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # a line per shape it cannot type
  return jax2onnx.to_onnx(
      ordered,
      [jax.ShapeDtypeStruct(("batch", size, size, 3), jnp.uint8)],
      model_name=f"rma_jax_{view}", input_names=["images"], output_names=names)


def _output_shapes(run: trained.TrainedRun, view: str) -> dict[str, list[Any]]:
  size = _size(run, view)
  shapes = jax.eval_shape(_serving_fn(run, view), {"params": run.params},
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8))
  return {k: ["batch", *v.shape[1:]] for k, v in shapes.items()}


def _write(path: str, data: bytes, files: dict[str, dict[str, Any]]) -> None:
  paths_lib.write_atomic(path, data)
  files[os.path.basename(path)] = {"sha256": hashlib.sha256(data).hexdigest(),
                                   "bytes": len(data)}


def export_run(run: trained.TrainedRun, out_dir: str, *,
               formats: Sequence[str] = ("stablehlo",), overwrite: bool = False,
               platforms: Sequence[str] = PLATFORMS,
               progress: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes the artifacts of ``formats`` and ``export.json`` to ``out_dir``.

  Returns:
    the manifest written to ``export.json`` (module docstring).

  Raises:
    ExportError: an unknown format or platform, or ``out_dir`` holds an export already
      (unless ``overwrite``).
  """
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise ExportError(f"--formats must name some of {','.join(FORMATS)}; got "
                      f"{','.join(unknown) or 'none'}")
  if set(platforms) - set(PLATFORMS):
    raise ValueError(f"platforms must be some of {PLATFORMS}, got {platforms}")
  manifest_path = os.path.join(out_dir, MANIFEST)
  if paths_lib.path(manifest_path).exists():
    if not overwrite:
      raise ExportError(f"{out_dir} holds an export already ({MANIFEST}); pass --overwrite "
                        "to replace it, or another --out")
    old = json.loads(paths_lib.path(manifest_path).read_text()).get("files", {})
    paths_lib.path(manifest_path).unlink()  # the folder is no export until the new one is
    for name in old:  # what the new export will not write again must not be taken for it
      if paths_lib.path(os.path.join(out_dir, name)).exists():
        paths_lib.path(os.path.join(out_dir, name)).unlink()
  paths_lib.path(out_dir).mkdir(parents=True, exist_ok=True)

  files: dict[str, dict[str, Any]] = {}
  opset = None
  names = param_names(run.params)
  if "stablehlo" in formats:
    buffer = io.BytesIO()
    leaves = jax.device_get(jax.tree_util.tree_leaves(run.params))
    np.savez(buffer, **{n: np.asarray(x) for n, x in zip(names, leaves)})
    _write(os.path.join(out_dir, PARAMS_FILE), buffer.getvalue(), files)
  for view in VIEWS:
    for fmt in formats:
      start = time.monotonic()
      if fmt == "stablehlo":
        data = stablehlo(run, view, platforms).serialize()
      else:
        proto = onnx_model(run, view)
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        data = proto.SerializeToString()
      name = f"{view}.{fmt}"
      _write(os.path.join(out_dir, name), bytes(data), files)
      progress(f"export: {name} ({len(data) / 2**20:.2f} MiB"
               + (f", for {', '.join(platforms)}" if fmt == "stablehlo" else "")
               + f") in {time.monotonic() - start:.1f}s")

  config = run.config
  manifest = {
      "format_version": FORMAT_VERSION,
      "rma_jax_version": rma_jax.__version__, "jax_version": jax.__version__,
      "workdir": paths_lib.absolute(run.workdir) if run.workdir else None,
      "checkpoint_step": run.step, "ema": run.ema, "model": config.model.name,
      "trunk": config.model.get("trunk", "vgg16"),
      "class_names": list(run.class_names),
      "inputs": {view: {"name": "images", "shape": ["batch", _size(run, view), _size(run, view), 3],
                        "dtype": "uint8", "layout": "NHWC, RGB", "resize": RESIZE}
                 for view in VIEWS},
      "normalization": {"pixel_convention": config.data.pixel_convention,
                        "where": "inside the model (rma_jax.pixels.normalize)"},
      "outputs": {view: _output_shapes(run, view) for view in VIEWS},
      "score_transform": run.score_transform,
      "threshold": float(config.eval.threshold), "top_k": config.eval.get("top_k"),
      "stablehlo": ({"platforms": list(platforms), "parameters": PARAMS_FILE,
                     "parameter_order": names} if "stablehlo" in formats else None),
      "onnx": ({"opset": opset, "parameters": "inside the model"}
               if "onnx" in formats else None),
      "files": files,
      "config": json.loads(config.to_json_best_effort()),
  }
  paths_lib.write_atomic(manifest_path, json.dumps(manifest, indent=2))
  progress(f"export: {len(files)} files and {MANIFEST} in {out_dir}")
  return manifest


def run(config: ml_collections.ConfigDict, workdir: str, out_dir: str, *,
        formats: Sequence[str] = ("stablehlo",), overwrite: bool = False) -> dict[str, Any]:
  """``--mode=export``: the best checkpoint of ``workdir`` (refused if none) to ``out_dir``."""
  try:
    loaded = trained.load_run(workdir, config, fallback=False, purpose="export")
  except FileNotFoundError as e:
    raise ExportError(f"cannot export {workdir}: {e}") from e
  return export_run(loaded, out_dir, formats=formats, overwrite=overwrite)
