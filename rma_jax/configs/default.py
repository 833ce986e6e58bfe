r"""Defaults shared by every config: the paper's settings (docs/design.md §2–4) on PASCAL VOC 2007.

    python -m rma_jax.main --config=configs/default.py --workdir=runs/voc512
    python -m rma_jax.main --config=configs/demo.py:tiny --workdir=/tmp/rma_tiny  # seconds

Other configs import ``get_config`` from here, override a few fields and end with
``apply_arg``. Any field can be set on the command line, e.g.
``--config.optim.learning_rate=3e-5``. The text after ``:`` in ``--config=FILE:ARG`` is
``get_config``'s argument: ``tiny`` shrinks any config to a seconds-long run (``tiny``).
"""

from __future__ import annotations

import ml_collections

ARGS = ("tiny",)
"""What may follow ``:`` in ``--config=FILE:ARG`` (nothing: the config as it is)."""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The defaults; ``arg``: '' / None or 'tiny' (``apply_arg``)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data (docs/design.md §3; docs/data.md). source: tfds | voc | coco | list | demo | local (detects
  # voc, coco or list). name: voc2007 | coco2014 with tfds, demo with demo, any name otherwise.
  c.data = ml_collections.ConfigDict()
  c.data.name = "voc2007"
  c.data.source = "tfds"
  c.data.data_dir = ""  # the VOC2007 folder, COCO root or folder of the list files; tfds: data_dir
  c.data.image_root = ""  # list: relative image paths start here ("" = the list file's folder)
  c.data.class_names = ""  # "a,b,c": the class list; "" = the data's own (docs/data.md)
  c.data.max_skip_fraction = 0.05  # a split with more skipped examples stops the run
  c.data.train_split = "trainval"
  c.data.test_split = "test"
  c.data.val_split = ""  # "" = a held-out slice of the training split (never the test split)
  c.data.val_fraction = 0.1
  c.data.image_size = 512  # N: images are resized to N x N
  c.data.crop_size = 448  # N - 64: training crops and single-view evaluation
  c.data.random_flip = True  # random horizontal flips in training (the paper)
  c.data.pixel_convention = "caffe"  # caffe (BGR, mean) | torch (RGB /255, mean/std) | unit
  c.data.num_workers = 2  # decoding worker processes per host (0: in the main process)
  c.data.prefetch = 2  # batches prefetched to the devices
  c.data.max_pixels = 89_478_485  # larger images are refused (decompression bombs)
  c.data.demo = ml_collections.ConfigDict()
  c.data.demo.num_train = 2000
  c.data.demo.num_val = 200
  c.data.demo.num_test = 500
  c.data.demo.canvas_size = 96

  # Model (docs/design.md §1). name: rma | baseline (rma_jax.build.HEADS); trunk: vgg16 |
  # resnet50 | resnet101 (rma_jax.build.TRUNKS).
  c.model = ml_collections.ConfigDict()
  c.model.name = "rma"
  c.model.trunk = "vgg16"
  c.model.width = 1
  # ResNet trunks only (docs/design.md §7): layer4's output stride, 32 | 16 (layer4 dilated),
  # and batch norm: frozen (statistics and affine as loaded) | finetune (scale and bias
  # trained, each batch normalised by the global batch's statistics, running averages kept).
  c.model.resnet_stride = 32
  c.model.bn = "frozen"
  # The blocks' scan compiled written out (the same numbers; the rolled loop's gradient is
  # ~10x slower on XLA:CPU, its compile ~2x faster).
  c.model.resnet_scan_unroll = True
  c.model.num_regions = 5  # K
  c.model.sample_size = 7  # S
  # W_fx's input: flatten (the paper: the S x S x C region) | avg (its mean over the S x S
  # samples, C values: the ResNet configs').
  c.model.region_pool = "flatten"
  c.model.x_dim = 4096
  c.model.hidden_dim = 512
  c.model.z_dim = 512
  c.model.standard_lstm = False  # True: h = o * tanh(c) instead of the paper's h = o * c
  c.model.theta_bias = (0.5, 0.5, 0.0, 0.0)
  c.model.theta_kernel_scale = 0.1
  c.model.fixed_regions = ""  # "" | "anchors": the fixed-regions control of Table 3
  # "" (the paper) | "anchors": a learned per-step theta bias added to b_m, initialised so
  # region 1 starts at the centre box and region k at its anchor (docs/ablations.md).
  c.model.region_init = ""
  c.model.dtype = "float32"  # float32 | bfloat16 (parameters stay float32)
  c.model.remat = False
  # The convolutions' kernels (rma_jax.kernels): auto | xla | patches | winograd. auto: the CPU
  # kernels (Winograd F(4x4, 3x3) and im2col forwards in evaluation, the matmul kernel
  # gradient in training, by per-layer rules) where a function is lowered for the CPU, XLA's
  # convolutions where it is lowered for a GPU or TPU; xla: XLA's everywhere. Same parameters.
  c.model.conv_impl = "auto"
  c.model.baseline_pool = "avg"  # the baseline's global pooling: avg | max
  c.model.trunk_init = "he"  # from-scratch conv init: he | dirac (identity where C_in = C_out)

  # Loss (docs/design.md §2). classification: softmax_euclidean (Eq. 7-8) | sigmoid_bce | asl
  # (the asymmetric loss of ASL, docs/training.md).
  c.loss = ml_collections.ConfigDict()
  c.loss.classification = "softmax_euclidean"
  c.loss.gamma = 0.1
  c.loss.alpha = 0.5
  c.loss.beta = 0.1
  c.loss.lambda_anchor = 0.01
  c.loss.lambda_positive = 0.1
  c.loss.use_anchor = True
  c.loss.use_scale = True
  c.loss.use_positive = True
  # Options tried to make the regions find the objects (docs/ablations.md), off by default:
  # a lower bound on the region half-sizes, a squared hinge max(0, min_scale - |s|)^2 added
  # to l_S for both axes (0 = off);
  c.loss.min_scale = 0.0
  # an anchor-weight schedule: lambda_anchor decays geometrically, epoch by epoch, from
  # lambda_anchor_start to lambda_anchor over the first anchor_schedule_epochs (0 = off).
  c.loss.anchor_schedule_epochs = 0
  c.loss.lambda_anchor_start = 1.0
  # The asymmetric loss (classification='asl'; ASL's settings): the focusing exponents of the
  # positives and negatives, the probability margin of the negatives, and whether the
  # focusing weights are constants of the gradient (as ASL trains).
  c.loss.gamma_pos = 0.0
  c.loss.gamma_neg = 4.0
  c.loss.clip = 0.05
  c.loss.asl_detach_focus = True

  # Optimisation (docs/design.md §3): Adam, lr 1e-5 divided by 10 after 30 epochs, 45 epochs.
  c.optim = ml_collections.ConfigDict()
  c.optim.batch_size = 16  # global batch, over all devices and hosts
  c.optim.num_epochs = 45
  c.optim.learning_rate = 1e-5
  c.optim.schedule = "step"  # step | cosine | constant
  c.optim.decay_epochs = (30,)
  c.optim.decay_factor = 0.1
  c.optim.warmup_steps = 0  # in optimizer steps (one global batch each)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip_norm = 0.0  # 0 = off
  c.optim.trunk_lr_multiplier = 1.0
  # Micro-batches per optimizer step: the jitted step splits each global batch into this many
  # and sums their gradients. Every step count here (schedule, warmup_steps, max_steps,
  # log_every_steps, checkpoint_every_steps) counts optimizer steps, not micro-batches.
  c.optim.grad_accum_steps = 1
  # The exponential moving average of the parameters (0 = off; ASL: 0.9997), validated beside
  # them: the lower validation loss is kept. ema_warmup_steps > 0: a warm-up of the decay,
  # decay * (1 - exp(-step / ema_warmup_steps)) (YOLOv5's: 2000; ASL's average has none).
  c.optim.ema_decay = 0.0
  c.optim.ema_warmup_steps = 0

  # Initialisation. pretrained: an orbax checkpoint of ImageNet VGG-16 weights
  # (python -m rma_jax.pretrained). stage1: the paper's two-step recipe inside one command:
  # with stage1.num_epochs > 0 a baseline is trained first in WORKDIR/stage1 and its trunk
  # (and fc6 -> W_fx where it has one) initialises the attention model.
  c.init = ml_collections.ConfigDict()
  c.init.pretrained = ""
  c.init.from_checkpoint = ""  # a stage-1 workdir or checkpoint to initialise the trunk from
  c.stage1 = ml_collections.ConfigDict()
  c.stage1.num_epochs = 0
  c.stage1.learning_rate = 1e-5
  c.stage1.classification = "softmax_euclidean"

  # Evaluation (docs/design.md §4).
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16
  c.eval.ten_view = True
  c.eval.scales = (512,)  # e.g. (512, 640) for the paper's two-scale fusion
  c.eval.ap_mode = "voc07"  # voc07 (11-point) | all
  c.eval.top_k = 3
  c.eval.threshold = 0.5
  # auto (softmax after softmax_euclidean, sigmoid after sigmoid_bce and asl) | softmax |
  # sigmoid | none: applied before AP.
  c.eval.score_transform = "auto"
  # CP…OF1 threshold scale: auto = softmax_max for the softmax-Euclidean loss (a label counts
  # when it has >= threshold x the top label's probability), sigmoid for sigmoid_bce and asl.
  c.eval.prf_score_transform = "auto"
  c.eval.svm = False
  c.eval.allow_small_val = False  # True: accept a validation split smaller than one eval batch

  # Loop.
  c.log_every_steps = 50  # optimizer steps
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 500  # optimizer steps
  c.max_to_keep = 2
  c.max_steps = -1  # > 0: stop after this many optimizer steps (tests, smoke runs)
  # Resuming with another seed, batch size, learning rate... (rma_jax.workdir) is refused
  # unless this is True; the change is then recorded in WORKDIR/config_history.jsonl.
  c.allow_config_change = False
  return apply_arg(c, arg)


def apply_arg(config: ml_collections.ConfigDict, arg: str | None
              ) -> ml_collections.ConfigDict:
  """``config`` as ``--config=FILE:ARG`` asks for: as it is ('' or None), or ``tiny``."""
  if not arg:
    return config
  if arg == "tiny":
    return tiny(config)
  raise ValueError(f"--config=FILE:{arg}: unknown config argument {arg!r}; after ':' comes "
                   f"nothing or one of {', '.join(ARGS)} (e.g. --config=configs/demo.py:tiny)")


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` shrunk in place to a seconds-long run on a CPU (big_vision's ``runlocal``).

  The same run in miniature: the data set, model kind, losses, recipe (both stages where
  ``stage1.num_epochs > 0``), schedule and evaluation protocol stay; widths, images, splits,
  batches and the number of steps shrink. A width/16 VGG with 32-16-16 attention sizes on
  64 px images (48 px crops, conv5_3 3 x 3), one evaluation scale, batches of 8 (they divide
  over 1, 2, 4 or 8 devices), the demo's splits 64 / 16 / 16 (the validation split holds two
  evaluation batches), and at most 4 optimizer steps per stage with checkpoints at 2 and 4.
  A ResNet trunk (stride 32) crops 32 px (a 1 x 1 map; 2 x 2 at 64 px), keeps its blocks'
  loops rolled (faster to compile) and, trained from scratch, fine-tunes its batch norm
  (frozen statistics would stay at their initial values).
  Tests start from it and override only what they test.
  """
  c = config
  c.model.update(width=16, x_dim=32, hidden_dim=16, z_dim=16)
  c.data.update(image_size=64, crop_size=48)
  if c.model.trunk != "vgg16":
    c.data.crop_size = 32
    c.model.bn = "finetune"
    c.model.resnet_scan_unroll = False  # compile time; the numbers are the same
  c.data.demo.update(num_train=64, num_val=16, num_test=16, canvas_size=64)
  c.optim.batch_size = 8
  c.eval.batch_size = 8
  c.eval.scales = (c.data.image_size,)
  c.max_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  return c
