"""Verifiable-reward tasks for policy optimisation: prompts as token arrays, rewards on text.

A task is questions with gold answers and a text reward; a codec turns text into token ids and
back (a `CharVocab` for tiny models, a `transformers` tokenizer with its chat template for real
ones). `Task.prompt_arrays(codec)` gives the left-padded [P, Lp] arrays that
`train.policy_opt.PolicyOptimizer` rolls out; `Task.rewards(codec, ...)` scores completions.

Tasks:
  arithmetic   generated problems (`data.arithmetic`); style "compact" ("23+58=") or "chat"
  math_jsonl   MATH / GSM8K JSON lines (`data.reasoning.load_reasoning_jsonl`), \\boxed answers
  first_token  the arithmetic prompts, reward 1 iff the completion starts with `target`: a
               trivially learnable task for end-to-end tests
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from etils import epath

from contrastive_jax.data.arithmetic import arithmetic_examples, arithmetic_reward
from contrastive_jax.data.char_vocab import CharVocab, left_pad
from contrastive_jax.data.math_answers import grade
from contrastive_jax.data.reasoning import load_reasoning_jsonl

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class CharCodec:
  """`CharVocab` as a codec: prompt = bos + characters; completion = characters + eos."""

  def __init__(self, vocab: CharVocab):
    self.vocab = vocab
    self.pad_id, self.eos_ids, self.vocab_size = vocab.pad_id, (vocab.eos_id,), vocab.vocab_size

  def encode_prompt(self, text: str) -> list[int]:
    return self.vocab.encode(text, bos=True)

  def encode_completion(self, text: str) -> list[int]:
    return self.vocab.encode(text, eos=True)

  def decode(self, ids) -> str:
    return self.vocab.decode(ids)


class HFCodec:
  """A `transformers` tokenizer; with `chat=True` the prompt goes through its chat template.

  Args:
    tokenizer: a (fast) tokenizer.
    chat: wrap each question as one user turn and add the generation prompt.
    system: optional system message (chat only).
    eos_ids: stop tokens (`weights.stop_tokens.stop_token_ids`: the chat template's end of turn
      first); default the tokenizer's eos token. A chat completion is written ending with the
      first, a plain one with the tokenizer's eos.
  """

  def __init__(self, tokenizer, *, chat: bool, system: str = "", eos_ids: Sequence[int] = ()):
    self.tok, self.chat, self.system = tokenizer, chat, system
    eos = tuple(eos_ids) or (tokenizer.eos_token_id,)
    if any(e is None for e in eos):
      raise ValueError("HFCodec: the tokenizer has no eos token; pass eos_ids")
    self.eos_ids = tuple(int(e) for e in eos)
    plain = tokenizer.eos_token_id
    self.end_id = self.eos_ids[0] if chat or plain is None else int(plain)
    pad = tokenizer.pad_token_id
    self.pad_id = int(pad if pad is not None else self.eos_ids[0])
    self.vocab_size = len(tokenizer)

  def encode_prompt(self, text: str) -> list[int]:
    if not self.chat:
      return self.tok.encode(text, add_special_tokens=True)
    turns = ([{"role": "system", "content": self.system}] if self.system else []) + [
      {"role": "user", "content": text}
    ]
    rendered = self.tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return self.tok.encode(rendered, add_special_tokens=False)

  def encode_completion(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False) + [self.end_id]

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    for j, i in enumerate(ids):
      if i in self.eos_ids:
        ids = ids[:j]
        break
    return self.tok.decode(ids, skip_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class Task:
  """Questions [P] and gold answers [P] with a text reward: "math" (`math_answers`: `grader`,
  a `MathGrader`, over a batch; else `grade` in-process, by the rule `extraction`), "chat" /
  "compact" (`arithmetic_reward`: an integer literal) or "first_token"."""

  questions: tuple[str, ...]
  golds: tuple[str, ...]
  reward_style: str
  target: str = ""
  extraction: str = "boxed"
  grader: object = dataclasses.field(default=None, compare=False, repr=False)

  def __len__(self):
    return len(self.questions)

  def prompt_arrays(self, codec, *, max_len: int | None = None):
    """(tokens [P, Lp], mask [P, Lp]) int32, left-padded; a prompt over `max_len` raises."""
    rows = [codec.encode_prompt(q) for q in self.questions]
    return left_pad(rows, length=max_len, pad_id=codec.pad_id)

  def reward(self, completion: str, index: int) -> float:
    if self.reward_style == "first_token":
      return 1.0 if completion.startswith(self.target) else 0.0
    if self.reward_style == "math":
      return grade(completion, self.golds[index], extraction=self.extraction)
    return arithmetic_reward(completion, self.golds[index], style=self.reward_style)

  def texts(self, codec, tokens, mask) -> list[str]:
    """The decoded completions of tokens [N, T] (mask [N, T])."""
    return [codec.decode(row[m > 0]) for row, m in zip(np.asarray(tokens), np.asarray(mask))]

  def score_texts(self, completions, prompt_ids) -> np.ndarray:
    """[N] rewards of decoded completions [N] of prompts `prompt_ids` [N]."""
    ids = [int(i) for i in prompt_ids]
    if self.reward_style == "math" and self.grader is not None:
      return np.asarray(self.grader(list(completions), [self.golds[i] for i in ids]), np.float32)
    return np.array([self.reward(c, i) for c, i in zip(completions, ids)], np.float32)

  def rewards(self, codec, prompt_ids, tokens, mask) -> np.ndarray:
    """[N] rewards of completions tokens [N, T] (mask [N, T]) of prompts `prompt_ids` [N]."""
    return self.score_texts(self.texts(codec, tokens, mask), prompt_ids)


def arithmetic_task(*, split: str, start: int, count: int, style: str, seed: int, digits: int,
                    num_operands: int, operators: str, test_fraction: float = 0.1) -> Task:
  """`count` generated arithmetic problems of `split` from index `start` (`data.arithmetic`)."""
  pairs = arithmetic_examples(start, count, style=style, seed=seed, split=split, digits=digits,
                              num_operands=num_operands, operators=tuple(operators),
                              test_fraction=test_fraction)
  return Task(tuple(p for p, _ in pairs), tuple(a for _, a in pairs), style)


def math_jsonl_task(path: str, *, dataset: str, limit: int | None, key: str,
                    instruction: str = MATH_INSTRUCTION, extraction: str = "boxed",
                    grader=None) -> Task:
  """MATH/GSM8K JSON lines (or a benchmark's records, `data.reasoning.BENCHMARKS`) as a chat
  task graded by `grader` (a `MathGrader`; None: in-process); a missing file raises naming `key`
  and the path."""
  if not path or not epath.Path(path).is_file():
    raise FileNotFoundError(f"{key}={path!r}: no such JSONL file ({dataset} problems)")
  pairs = load_reasoning_jsonl(path, dataset=dataset, limit=limit)
  questions = tuple(f"{q}\n{instruction}" if instruction else q for q, _ in pairs)
  return Task(questions, tuple(a for _, a in pairs), "math", extraction=extraction,
              grader=grader)
