"""An independent PyTorch implementation of the RMA network, for speed and numerics checks.

Never imported by the ``rma_jax`` package: ``benchmarks.bench`` imports it only when torch is
installed, and ``tests/test_torch_crosscheck.py`` uses it as a numerical cross-check. It
re-derives the network from the paper (and docs/design.md §1–2) in plain PyTorch, so that a bug in one
implementation shows up as a mismatch against the other:

* VGG-16 conv1_1 … conv5_3 (3x3, ReLU, 2x2 max-pool after blocks 1–4, no pool5), NCHW, run
  in ``channels_last`` memory format by default (oneDNN's fast path on CPU); or
  torchvision's ResNet-50/101 (v1.5 bottleneck) to layer4 with torchvision's module names
  (``TorchResNet``; torchvision itself is not needed).
* The scale-and-translate sampler, either separable (tent-weight matrices and two matmuls)
  or generic (``F.affine_grid`` + ``F.grid_sample``, bilinear, zeros, align_corners=False).
* W_fx on the flattened S x S x C region (the paper) or on its mean over the S x S samples
  (``region_pool='avg'``, the ResNet configs'; docs/design.md §7).
* The paper's LSTM (Eq. 4: gates i, g (forget), o, m; ``h = o * c``), K+1 steps, step 0
  unscored, category-wise max over the K region scores (Eq. 6).
* The losses: softmax + squared distance to the normalised labels (Eq. 7–8) and the
  anchor/scale/positive constraints (Eq. 9–13), ``L = L_cls + gamma L_loc`` (Eq. 14).

``load_flax_params`` copies a Flax ``RMA``/``VGG16`` parameter tree into these modules
(conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in)); fc6 flattens the sampled
region in (h, w, c) order, as the Flax model does. A ResNet trunk's parameters go by
torchvision's state-dict names, the ones ``python -m rma_jax.pretrained`` reads
(``rma_jax.weights.convert``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def _float(dtype: torch.dtype) -> torch.dtype:
  """float32 for float32/bfloat16/float16 tensors, float64 for float64 (``model.double()``
  runs the whole network, sampler and losses included, in float64)."""
  return torch.promote_types(dtype, torch.float32)


def layer_names() -> list[str]:
  return [f"conv{b + 1}_{i + 1}" for b, block in enumerate(VGG16_BLOCKS)
          for i in range(len(block))]


class TorchVGG16(nn.Module):
  """VGG-16 conv1_1 … conv5_3 with an optional global-pool + linear head (the baseline)."""

  def __init__(self, width: int = 1, num_classes: int | None = None):
    super().__init__()
    self.convs = nn.ModuleDict()
    in_ch = 3
    for name, out in zip(layer_names(), (c for b in VGG16_BLOCKS for c in b)):
      self.convs[name] = nn.Conv2d(in_ch, out // width, 3, padding=1)
      in_ch = out // width
    self.out_channels = in_ch
    self.head = nn.Linear(in_ch, num_classes) if num_classes else None

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C5, H/16, W/16) conv5_3, or (B, num_classes) with a head."""
    x = images
    names = iter(layer_names())
    for b, block in enumerate(VGG16_BLOCKS):
      for _ in block:
        x = F.relu(self.convs[next(names)](x))
      if b < 4:
        x = F.max_pool2d(x, 2, 2)
    if self.head is None:
      return x
    return self.head(x.to(_float(x.dtype)).mean(dim=(2, 3)))


RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class TorchBottleneck(nn.Module):
  """torchvision's ``Bottleneck`` (v1.5: the stride on the 3x3 convolution), its names."""

  def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
               downsample: nn.Module | None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
  """torchvision's ``ResNet`` with ``Bottleneck``: its module names (``conv1``, ``bn1``,
  ``layer1.0.downsample.0`` …, and ``fc``, which ``forward`` does not use), every channel
  count divided by ``width``; ``forward`` is the layer4 map (no pooling). ``dilate_layer4``:
  torchvision's ``replace_stride_with_dilation=[False, False, True]`` (stride 16)."""

  def __init__(self, depth: int = 50, dilate_layer4: bool = False, width: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64 // width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64 // width)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.inplanes, self.dilation = 64 // width, 1
    for i, blocks in enumerate(RESNET_DEPTHS[depth]):
      setattr(self, f"layer{i + 1}", self._make_layer(
          64 * 2**i // width, blocks, 1 if i == 0 else 2, dilate=dilate_layer4 and i == 3))
    self.out_channels = self.inplanes
    self.stride = 16 if dilate_layer4 else 32
    self.fc = nn.Linear(self.inplanes, 1000)

  def _make_layer(self, planes: int, blocks: int, stride: int, dilate: bool) -> nn.Module:
    previous = self.dilation
    if dilate:  # torchvision's _make_layer(dilate=True)
      self.dilation *= stride
      stride = 1
    downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                               nn.BatchNorm2d(planes * 4))
    out = [TorchBottleneck(self.inplanes, planes, stride, previous, downsample)]
    self.inplanes = planes * 4
    out += [TorchBottleneck(self.inplanes, planes, 1, self.dilation, None)
            for _ in range(1, blocks)]
    return nn.Sequential(*out)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 2048 / width, H / stride, W / stride) layer4."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def interpolation_matrix(scale: torch.Tensor, shift: torch.Tensor, out_size: int,
                         in_size: int) -> torch.Tensor:
  """(...,) scale and shift -> (..., out_size, in_size) bilinear tent weights.

  Output sample i sits at normalised coordinate (2i + 1)/out - 1 of the region; the region
  maps it to ``scale * u + shift`` in the input, whose pixel index (align_corners=False) is
  ``((x + 1) * in_size - 1) / 2``. The weight of input pixel p is ``max(0, 1 - |pix - p|)``;
  pixels outside the map simply have no column (zero padding). float32, or float64 for
  float64 ``scale``/``shift``.
  """
  dtype = _float(torch.promote_types(scale.dtype, shift.dtype))
  u = (2.0 * torch.arange(out_size, dtype=dtype, device=scale.device) + 1.0) / out_size - 1.0
  src = scale.to(dtype)[..., None] * u + shift.to(dtype)[..., None]
  pix = ((src + 1.0) * in_size - 1.0) / 2.0
  grid = torch.arange(in_size, dtype=dtype, device=scale.device)
  return torch.clamp(1.0 - (pix[..., :, None] - grid).abs(), min=0.0)


def sample_separable(fmap: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
  """(B, C, H, W) maps, (B, R, 4) theta -> (B, R, C, S, S) by two small matmuls."""
  _, _, h, w = fmap.shape
  a_y = interpolation_matrix(theta[..., 1], theta[..., 3], size, h).to(fmap.dtype)  # B,R,S,H
  a_x = interpolation_matrix(theta[..., 0], theta[..., 2], size, w).to(fmap.dtype)  # B,R,S,W
  rows = torch.einsum("brjw,bchw->brchj", a_x, fmap)
  return torch.einsum("brih,brchj->brcij", a_y, rows)


def sample_grid(fmap: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
  """The same sampling with ``F.affine_grid`` + ``F.grid_sample`` (align_corners=False)."""
  b, c, h, w = fmap.shape
  r = theta.shape[1]
  sx, sy, tx, ty = theta.to(_float(theta.dtype)).unbind(-1)
  zero = torch.zeros_like(sx)
  mats = torch.stack([torch.stack([sx, zero, tx], -1), torch.stack([zero, sy, ty], -1)], -2)
  grid = F.affine_grid(mats.reshape(b * r, 2, 3), [b * r, c, size, size], align_corners=False)
  src = fmap[:, None].expand(b, r, c, h, w).reshape(b * r, c, h, w)
  out = F.grid_sample(src, grid.to(fmap.dtype), mode="bilinear", padding_mode="zeros",
                      align_corners=False)
  return out.reshape(b, r, c, size, size)


SAMPLERS = {"separable": sample_separable, "grid_sample": sample_grid}


class TorchAttentionCell(nn.Module):
  """Eq. 2, 4, 5: region features -> LSTM -> (s_k, next transform, z_k)."""

  def __init__(self, channels: int, num_classes: int, sample_size: int = 7, x_dim: int = 4096,
               hidden_dim: int = 512, z_dim: int = 512, region_pool: str = "flatten"):
    super().__init__()
    inputs = channels if region_pool == "avg" else sample_size * sample_size * channels
    self.fc6 = nn.Linear(inputs, x_dim)
    self.lstm_x = nn.Linear(x_dim, 4 * hidden_dim)
    self.lstm_h = nn.Linear(hidden_dim, 4 * hidden_dim, bias=False)
    self.hz = nn.Linear(hidden_dim, z_dim)
    self.zs = nn.Linear(z_dim, num_classes)
    self.zm = nn.Linear(z_dim, 4)


class TorchRMA(nn.Module):
  """A trunk (VGG-16, or ResNet-50/101: ``trunk='resnet50'`` …, ``resnet_stride`` 32 or 16)
  + the recurrent memorized-attention module."""

  def __init__(self, num_classes: int, num_regions: int = 5, sample_size: int = 7,
               width: int = 1, x_dim: int = 4096, hidden_dim: int = 512, z_dim: int = 512,
               standard_lstm: bool = False, sampler: str = "separable",
               trunk: str = "vgg16", resnet_stride: int = 32, region_pool: str = "flatten"):
    super().__init__()
    if trunk == "vgg16":
      self.trunk = TorchVGG16(width)
      self.stride = 16
    else:
      self.trunk = TorchResNet(int(trunk[len("resnet"):]), resnet_stride == 16, width)
      self.stride = self.trunk.stride
    self.region_pool = region_pool
    self.cell = TorchAttentionCell(self.trunk.out_channels, num_classes, sample_size, x_dim,
                                   hidden_dim, z_dim, region_pool)
    self.num_regions = num_regions
    self.sample_size = sample_size
    self.hidden_dim = hidden_dim
    self.standard_lstm = standard_lstm
    self.sampler = SAMPLERS[sampler]

  def features(self, images: torch.Tensor) -> torch.Tensor:
    return self.trunk(images)

  def attend(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, C, h, w) conv5_3 -> scores (B, C'), region_scores (B, K, C'), theta (B, K+1, 4)."""
    b = fmap.shape[0]
    cell = self.cell
    dtype = _float(fmap.dtype)
    c = fmap.new_zeros((b, self.hidden_dim), dtype=dtype)
    h = c
    theta = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=dtype, device=fmap.device).expand(b, 4)
    scores, thetas = [], []
    for _ in range(self.num_regions + 1):
      region = self.sampler(fmap, theta[:, None], self.sample_size)[:, 0]  # B, C, S, S
      if self.region_pool == "avg":
        flat = region.to(dtype).mean(dim=(2, 3)).to(region.dtype)
      else:
        # Flatten in (h, w, c) order like the Flax model, so fc6 weights are shared 1:1.
        flat = region.permute(0, 2, 3, 1).reshape(b, -1)
      x = F.relu(cell.fc6(flat))
      gates = (cell.lstm_x(x) + cell.lstm_h(h.to(x.dtype))).to(dtype)
      i, g, o, m = gates.chunk(4, dim=-1)
      c = torch.sigmoid(g) * c + torch.sigmoid(i) * torch.tanh(m)
      h = torch.sigmoid(o) * (torch.tanh(c) if self.standard_lstm else c)
      z = F.relu(cell.hz(h))
      scores.append(cell.zs(z).to(dtype))
      thetas.append(theta)
      theta = cell.zm(z).to(dtype)
    region_scores = torch.stack(scores[1:], dim=1)  # step 0's score is dropped
    return {"scores": region_scores.amax(dim=1), "region_scores": region_scores,
            "theta": torch.stack(thetas, dim=1)}

  def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
    return self.attend(self.features(images))


def ten_view(model: TorchRMA, images: torch.Tensor, crop_size: int) -> torch.Tensor:
  """(B, 3, N, N) images -> (B, C') ten-view scores: trunk once, 5 crops x 2 flips of the map
  (patch ``crop_size / stride``), one batched attention call, view mean."""
  fmap = model.features(images)
  n, p = fmap.shape[-1], crop_size // model.stride
  offsets = [(0, 0), (0, n - p), (n - p, 0), (n - p, n - p), ((n - p) // 2, (n - p) // 2)]
  crops = [fmap[:, :, y:y + p, x:x + p] for y, x in offsets]
  views = torch.stack(crops + [cr.flip(-1) for cr in crops], dim=1)  # B, 10, C, p, p
  b = views.shape[0]
  out = model.attend(views.reshape(b * 10, *views.shape[2:]))
  return out["scores"].reshape(b, 10, -1).mean(dim=1)


# ----------------------------------------------------------------------------- losses


def anchor_points(num_regions: int) -> torch.Tensor:
  """The paper's four anchors in its order for K = 5; the 45-degree circle otherwise."""
  if num_regions == 5:
    return torch.tensor([[0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [-0.5, -0.5]])
  n = num_regions - 1
  ang = math.pi / 4 + 2 * math.pi * torch.arange(n, dtype=torch.float64) / max(n, 1)
  r = math.sqrt(2.0) / 2
  return torch.stack([r * torch.cos(ang), r * torch.sin(ang)], -1).float()


def classification_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """Eq. 7–8, mean over images with at least one positive label."""
  scores = scores.to(_float(scores.dtype))
  labels = labels.to(scores.dtype)
  num_pos = labels.sum(-1)
  target = labels / num_pos.clamp(min=1.0)[:, None]
  per = ((torch.softmax(scores, -1) - target) ** 2).sum(-1)
  keep = (num_pos > 0).to(scores.dtype)
  return (per * keep).sum() / keep.sum().clamp(min=1.0)


def localization_loss(theta: torch.Tensor, alpha: float = 0.5, beta: float = 0.1,
                      lambda_anchor: float = 0.01, lambda_positive: float = 0.1) -> torch.Tensor:
  """Eq. 9–13 on (B, K, 4) transforms of regions 1..K; summed over regions, batch mean."""
  sx, sy, tx, ty = theta.to(_float(theta.dtype)).unbind(-1)
  anchors = anchor_points(theta.shape[1]).to(theta.device)
  anchor = 0.5 * ((tx[:, 1:] - anchors[:, 0]) ** 2 + (ty[:, 1:] - anchors[:, 1]) ** 2)
  scale = F.relu(sx.abs() - alpha) ** 2 + F.relu(sy.abs() - alpha) ** 2
  positive = F.relu(beta - sx) + F.relu(beta - sy)
  per = scale.sum(1) + lambda_anchor * anchor.sum(1) + lambda_positive * positive.sum(1)
  return per.mean()


def total_loss(out: Mapping[str, torch.Tensor], labels: torch.Tensor, gamma: float = 0.1
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """(L, L_cls, L_loc) of Eq. 14."""
  cls = classification_loss(out["scores"], labels)
  loc = localization_loss(out["theta"][:, 1:])
  return cls + gamma * loc, cls, loc


# ----------------------------------------------------------------------------- weights


def _t(a: Any) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32))


def _copy_dense(linear: nn.Linear, p: Mapping[str, Any]) -> None:
  linear.weight.copy_(_t(p["kernel"]).T)
  if linear.bias is not None:
    linear.bias.copy_(_t(p["bias"]))


def torchvision_resnet_names(trunk: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A Flax ``models.ResNet`` tree -> {torchvision's state-dict name: array in torch's
  layout}: ``layerL_rest`` unstacked to ``layerL.1`` …, kernels HWIO -> OIHW, batch norm's
  ``scale``/``bias``/``mean``/``var`` -> ``weight``/``bias``/``running_mean``/``running_var``
  (the names ``rma_jax.weights.convert`` reads, spelt out independently here)."""
  leaf_names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}
  modules = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
  out = {}

  def walk(tree, names):
    if not isinstance(tree, Mapping):
      a = np.asarray(tree, np.float32)
      out[".".join(names[:-1] + [leaf_names[names[-1]]])] = (
          a.transpose(3, 2, 0, 1) if names[-1] == "kernel" else a)
      return
    for key, sub in tree.items():
      rest = re.fullmatch(r"(layer\d)_rest", key)
      first = re.fullmatch(r"(layer\d)_0", key)
      if rest:
        count = np.shape(next(iter(_leaves(sub))))[0]
        for i in range(count):
          walk(_index(sub, i), names + [f"{rest[1]}.{i + 1}"])
      else:
        walk(sub, names + [f"{first[1]}.0" if first else modules.get(key, key)])
  walk(trunk, [])
  return out


def _leaves(tree):
  if isinstance(tree, Mapping):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def _index(tree, i):
  if isinstance(tree, Mapping):
    return {k: _index(v, i) for k, v in tree.items()}
  return np.asarray(tree)[i]


@torch.no_grad()
def load_flax_params(model: nn.Module, params: Mapping[str, Any]) -> nn.Module:
  """Copies a Flax ``RMA`` or ``VGG16`` parameter tree into ``TorchRMA``/``TorchVGG16`` (an
  RMA on a ResNet: its trunk by torchvision's names, ``torchvision_resnet_names``)."""
  trunk_model = model.trunk if isinstance(model, TorchRMA) else model
  trunk = params["trunk"] if isinstance(model, TorchRMA) else params
  if isinstance(trunk_model, TorchResNet):
    state = {k: _t(v) for k, v in torchvision_resnet_names(trunk).items()}
    missing, unexpected = trunk_model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")
                      and not k.endswith("num_batches_tracked")]:
      raise KeyError(f"ResNet names: missing {missing}, unexpected {unexpected}")
    trunk = None
  for name in layer_names() if trunk is not None else ():
    conv = trunk_model.convs[name]
    conv.weight.copy_(_t(trunk[name]["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
    conv.bias.copy_(_t(trunk[name]["bias"]))
  if isinstance(model, TorchRMA):
    cell = params["attention"]["cell"]
    for name in ("fc6", "lstm_x", "lstm_h", "hz", "zs", "zm"):
      _copy_dense(getattr(model.cell, name), cell[name])
  elif model.head is not None:
    _copy_dense(model.head, params["head"])
  return model


def to_nchw(images_nhwc: np.ndarray, channels_last: bool = True) -> torch.Tensor:
  """(B, H, W, 3) numpy -> (B, 3, H, W) torch tensor, channels_last memory if asked."""
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc, dtype=np.float32)).permute(0, 3, 1, 2)
  return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
