"""Offline DPO (Rafailov et al., arXiv 2305.18290; IPO arXiv 2310.12036; hinge/SLiC arXiv
2305.10425) from a frozen reference: the offline counterpart of 2-GRPO ("It Takes Two", arXiv
2510.00977, which reads a mixed G = 2 group as an online DPO pair).

  python launch.py --config configs/grpo.py:cpu_sft --workdir runs/grpo_cpu_sft   # policy start
  python launch.py --config configs/dpo.py:cpu --workdir runs/dpo_cpu
  python launch.py --config configs/dpo.py:cpu --workdir runs/dpo_cpu --mode eval
  python launch.py --config configs/dpo.py:jsonl --config.pairs.file=pairs.jsonl --workdir ...

cpu: generated arithmetic pairs (chosen: the gold answer; rejected: gold +- 1..10) on the SFT
policy (char vocab), beta 0.1, sigmoid loss; a few minutes on 2 cores. jsonl: SmolLM2-135M-
Instruct (GGUF) on {"prompt", "chosen", "rejected"} lines with its chat template. test: seconds.
"""

from configs.common import base_config, select_preset
from configs.grpo import eval_section, model_section, task_section


def get_config(preset: str = "cpu"):
  c = base_config("dpo")
  c.model = model_section()  # the policy's sections are GRPO's (configs/grpo.py)
  c.task = task_section()
  c.pairs = dict(source="arithmetic", file="", size=4096, heldout_fraction=0.1)
  # logprob_chunk: positions of logits at a time (0: whole sequences); logprob_batch: rows per
  # reference log-prob call (0: train.batch_size). The update's micro-batches are
  # train.grad_accum_steps (exact for DPO: a mean over equal-size micro-batches of pairs).
  c.loss = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, length_normalize=False,
                logprob_chunk=0, logprob_batch=0)
  c.eval.update(eval_section(k=0))
  c.train.update(steps=300, batch_size=64, log_every=25, eval_every=100, checkpoint_every=100)
  c.optim.update(name="adam", lr=1e-4, schedule="constant", grad_clip=1.0)

  def cpu(c):
    pass

  def jsonl(c):
    c.model.update(source="gguf", path="")
    c.task.update(style="chat", digits=1, test_size=64)
    c.pairs.update(source="jsonl", file="data/preferences.jsonl", size=0)
    c.eval.update(max_new_tokens=48, batch_size=64)
    c.train.update(steps=200, batch_size=8)
    c.optim.update(lr=5e-7)

  def test(c):
    c.model.update(source="scratch", path="", hidden=32, layers=1, heads=2, kv_heads=1, mlp=64)
    c.task.update(train_size=64, test_size=16)
    c.pairs.update(size=64)
    c.eval.update(batch_size=16, max_new_tokens=4)
    c.train.update(steps=4, batch_size=16, log_every=1, eval_every=2, checkpoint_every=2)
    c.optim.update(lr=1e-2)

  return select_preset(preset, {"cpu": cpu, "jsonl": jsonl, "test": test}, c)
