"""InfoNCE on scikit-learn's 8x8 digits: the foundation's demo of the shared training loop.

Two augmented views of each digit (shift by up to one pixel, pixel dropout, Gaussian noise) go
through an MLP encoder; symmetric InfoNCE with in-batch negatives (SimCLR's objective, Chen et
al. 2020) pulls the views together. Evaluation: 1-nearest-neighbour accuracy of held-out digits
against the embedded training split (raw pixels give 0.986 on this split, the cpu preset 0.961 after
600 steps: lower, and an honest one; the point of
this loop is the machinery, not the number).

  python launch.py --config configs/contrastive_digits.py:cpu --workdir /tmp/digits

Presets: cpu (about a minute on 2 cores), test (seconds; used by the tests).
"""

from configs.common import base_config, select_preset


def get_config(preset: str = "cpu"):
  c = base_config("contrastive_digits")
  c.model = dict(hidden=(256, 256), out_dim=64)
  c.loss = dict(temperature=0.1, symmetric=True, score="cosine")
  c.augment = dict(max_shift=1, drop_rate=0.1, noise=0.2)
  c.train.update(steps=600, batch_size=128, log_every=50, eval_every=200, checkpoint_every=200)
  c.optim.update(lr=1e-3, schedule="cosine", warmup_steps=50, ema=0.99)
  c.eval.params = "ema"

  def cpu(c):
    pass

  def test(c):
    c.model.update(hidden=(32,), out_dim=16)
    c.train.update(steps=20, batch_size=32, log_every=5, eval_every=10, checkpoint_every=10)
    c.optim.update(warmup_steps=2)

  return select_preset(preset, {"cpu": cpu, "test": test}, c)
