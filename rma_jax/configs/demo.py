r"""The embedded demo: digit canvases built in memory, the paper's two-step recipe on a CPU.

    python -m rma_jax.main --config=configs/demo.py --workdir=/tmp/rma_demo
    python -m rma_jax.main --config=configs/demo.py:tiny --workdir=/tmp/rma_tiny  # seconds
    python -m rma_jax.main --config=configs/demo.py:resnet50 --workdir=/tmp/rma_demo_resnet

Stage 1 trains the global-pooling baseline (docs/design.md §1) from scratch; stage 2 initialises the
attention model's trunk from it and trains the whole model; then the best checkpoint (lowest
validation loss) is evaluated on the test split and WORKDIR/report/report.md is written.
A width/8 trunk on 96 px crops gives a 6x6 conv5_3 map. See README "Demo" for what was tried.

``:resnet50`` (``resnet50_trunk``) swaps the trunk for a width/8 ResNet-50 at output stride 16
(layer4 dilated: the same 6x6 map at 96 px, 7x7 at 112) with fine-tuned batch norm (from
scratch, frozen statistics would stay at their initial values); the head, data and recipe stay
the VGG demo's. What it gives: docs/training.md, "The demo on a ResNet".
"""

from rma_jax.configs import default


RESNET_ARG = "resnet50"
"""``--config=configs/demo.py:resnet50``: the demo on a narrow ResNet-50 (``resnet50_trunk``)."""


def resnet50_trunk(c):
  """``c`` with its trunk a width/8 ResNet-50, stride 16, batch norm fine-tuned (in place)."""
  c.model.update(trunk="resnet50", resnet_stride=16, bn="finetune")
  return c


def get_config(arg=None):
  c = default.get_config()
  c.data.name = "demo"
  c.data.source = "demo"
  c.data.image_size = 112
  c.data.crop_size = 96
  c.data.pixel_convention = "torch"
  c.data.random_flip = False  # digits are chiral: a mirrored 2 is not a 2
  c.data.demo.num_train = 2000
  c.data.demo.num_val = 200
  c.data.demo.num_test = 500
  c.data.demo.canvas_size = 96
  # The canvases are in memory (nothing to decode, 96 px): starting worker processes, and
  # pickling the data set into them, costs more than they save.
  c.data.num_workers = 0

  c.model.width = 8
  # Identity-initialised equal-width convs: a width/8 VGG trained from scratch otherwise sits
  # on the class-prior plateau for a seed-dependent 300 to 1000+ steps (README "Demo").
  c.model.trunk_init = "dirac"
  c.model.sample_size = 3
  c.model.x_dim = 512
  c.model.hidden_dim = 256
  c.model.z_dim = 256

  c.optim.batch_size = 32
  c.optim.num_epochs = 10
  c.optim.learning_rate = 3e-4
  c.optim.schedule = "constant"
  c.optim.grad_clip_norm = 1.0

  c.stage1.num_epochs = 12
  c.stage1.learning_rate = 1e-3
  c.stage1.classification = "sigmoid_bce"

  c.eval.batch_size = 100
  c.eval.scales = (112,)
  c.eval.ap_mode = "all"

  c.log_every_steps = 50
  c.eval_every_epochs = 2
  c.checkpoint_every_steps = 200
  if arg == RESNET_ARG:
    return resnet50_trunk(c)
  return default.apply_arg(c, arg)
