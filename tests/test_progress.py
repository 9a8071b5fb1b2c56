"""The training loop's progress bar: its rate and ETA leave out the compile step; its label."""

import io

import ml_collections
from tqdm import tqdm

from contrastive_jax.train.loop import progress_label, restart_rate_clock


def _eta(bar):
  d = bar.format_dict
  rate = d["rate"] or (d["n"] - d["initial"]) / d["elapsed"]
  return (d["total"] - d["n"]) / rate


def test_rate_clock_restarts_after_the_first_step():
  bars = []
  for restart in (False, True):
    bar = tqdm(total=11, file=io.StringIO(), mininterval=0, smoothing=0)
    bar.start_t -= 100.0  # the first step took 100 s: compilation
    bar.update(1)
    if restart:
      restart_rate_clock(bar)
    bar.start_t -= 2.0  # then a steady 1 s per step
    bar.update(2)
    bars.append(bar)
  # Without the restart the ETA extrapolates (100 + 2) s / 3 steps over the 8 left: ~272 s;
  # with it, 2 s / 2 steps: 8 s.
  assert 250 < _eta(bars[0]) < 300
  assert 7.5 < _eta(bars[1]) < 8.5
  assert (bars[1].n, bars[1].initial, bars[1].total) == (3, 1, 11)


def test_progress_label_names_the_algorithm_where_it_differs():
  def cfg(**kw):
    return ml_collections.ConfigDict(kw)

  assert progress_label(cfg(experiment="grpo", algorithm="sft")) == "grpo sft"
  assert progress_label(cfg(experiment="grpo", algorithm="grpo")) == "grpo"
  assert progress_label(cfg(experiment="seal")) == "seal"
