"""The PyTorch side of ``benchmarks.bench``: ``benchmarks/torch_rma.py`` with the same
weights, shapes, batch and threads as the JAX side."""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import jax
import numpy as np


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


class TorchRunner:
  """The PyTorch side of each case, same weights and shapes as the JAX side."""

  def __init__(self, settings: Any, params: Any, threads: int, convention: str):
    # torch is optional: imported only when the PyTorch side runs.
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_rma  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.tr = torch_rma
    torch.set_num_threads(threads)
    self.settings = settings
    self.model = self.tr.TorchRMA(
        settings.num_classes, settings.num_regions, settings.sample_size, settings.width,
        settings.x_dim, settings.hidden_dim, settings.z_dim, trunk=settings.trunk,
        resnet_stride=settings.resnet_stride, region_pool=settings.region_pool)
    self.params = params
    self.reset_weights()
    self.model = self.model.to(memory_format=torch.channels_last).eval()
    # Batch norm as the JAX side's model.bn: frozen (statistics and affine fixed, as
    # detection codebases' FrozenBatchNorm) or fine-tuned (a training batch's statistics).
    self.finetune_bn = settings.bn == "finetune"
    for m in self.model.modules():
      if isinstance(m, torch.nn.BatchNorm2d) and not self.finetune_bn:
        m.requires_grad_(False)
    self.convention = convention
    self.bf16 = settings.dtype == "bfloat16"

  def reset_weights(self) -> None:
    """The JAX side's weights again (after the train case's steps changed them)."""
    self.tr.load_flax_params(self.model, jax.device_get(self.params))

  def _images(self, images_uint8: np.ndarray):
    torch = self.torch
    x = torch.from_numpy(images_uint8).float()
    if self.convention == "caffe":
      x = x.flip(-1) - torch.tensor([103.939, 116.779, 123.68])
    elif self.convention == "torch":
      x = (x / 255.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    else:
      x = x / 255.0 - 0.5
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

  def _autocast(self):
    return self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.bf16)

  def train_step_fn(self, batch: dict[str, np.ndarray], lr: float = 1e-5) -> Callable:
    torch = self.torch
    opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=lr,
                           betas=(0.9, 0.999), eps=1e-8)
    images = batch["image"]
    labels = torch.from_numpy(batch["labels"])

    def step():
      opt.zero_grad(set_to_none=True)
      self.model.train(self.finetune_bn)
      with self._autocast():
        out = self.model(self._images(images))
      loss, _, _ = self.tr.total_loss(out, labels)
      loss.backward()
      opt.step()
      self.model.eval()
      return loss.item()
    return step

  def single_view_fn(self, images: np.ndarray) -> Callable:
    torch = self.torch

    def fwd():
      with torch.inference_mode(), self._autocast():
        return self.model(self._images(images))["scores"].float().numpy()
    return fwd

  def ten_view_fn(self, images: np.ndarray) -> Callable:
    torch = self.torch

    def fwd():
      with torch.inference_mode(), self._autocast():
        return self.tr.ten_view(self.model, self._images(images),
                                self.settings.crop_size).float().numpy()
    return fwd
