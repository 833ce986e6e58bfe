r"""PASCAL VOC 2007 at the paper's settings (docs/design.md §2–4): N = 512, batch 16, Adam lr 1e-5 /10
after 30 epochs, 45 epochs, K = 5, S = 7; train on trainval, test on test.

    python -m rma_jax.main --config=configs/voc.py --workdir=runs/voc512 \
        --config.init.pretrained=weights/vgg16_keras

Data: TFDS ``voc/2007`` (prepare once: ``tfds build voc/2007``; ~870 MB download) or a local
``VOCdevkit/VOC2007`` tree (``--config.data.source=local --config.data.data_dir=PATH``).
The two-step recipe: stage 1 (the baseline, ``configs/voc_baseline.py``) fine-tunes the ImageNet
VGG-16; this config then starts from it with ``--config.init.from_checkpoint=runs/voc_baseline``,
or runs both stages in one command with ``--config.stage1.num_epochs=20``.
"""

from rma_jax.configs import default


def get_config(arg=None):
  c = default.get_config()
  c.data.name = "voc2007"
  c.data.train_split = "trainval"
  c.data.test_split = "test"
  c.eval.ap_mode = "voc07"
  c.eval.scales = (512,)
  return default.apply_arg(c, arg)
