"""Stop tokens (`weights.stop_tokens.stop_token_ids`) on tokenizer files shaped as Qwen2.5 ships
them, written here: the union of the tokenizer's eos, generation_config.json's eos_token_id list
and the chat template's end-of-turn token, as GRPO / DPO (`policy_setup.make_codec`) and GRACE
(`grace_eval.eos_ids`) use it."""

import json
import types

import pytest

from configs import grpo as grpo_config
from contrastive_jax.evaluation.grace_eval import eos_ids
from contrastive_jax.weights.stop_tokens import end_of_turn_id, stop_token_ids
from experiments import policy_setup

ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
# Qwen2.5's chat template without its tool-call branches (tokenizer_config.json "chat_template").
QWEN25_TEMPLATE = (
  "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content']"
  " + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba "
  "Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}"
  "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
  "(message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
  "'<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
  "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _qwen25_dir(path, *, eos: str, generation_eos):
  """A model directory with Qwen2.5's special tokens at their ids, its chat template, and the
  tokenizer / generation config eos of Qwen2.5-Math-1.5B (base) or -Instruct."""
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers

  chars = ["\n"] + [chr(c) for c in range(32, 127)]
  vocab = {c: i for i, c in enumerate(chars)} | {"<unk>": len(chars)}
  vocab |= {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START, "<|im_end|>": IM_END}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  path.mkdir()
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({
    "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": "<|endoftext|>",
    "chat_template": QWEN25_TEMPLATE, "model_max_length": 4096}))
  (path / "generation_config.json").write_text(json.dumps({
    "bos_token_id": ENDOFTEXT, "eos_token_id": generation_eos, "do_sample": True}))
  (path / "config.json").write_text(json.dumps({"eos_token_id": ENDOFTEXT}))
  return path


@pytest.mark.parametrize(
  "eos,generation_eos,tokenizer_eos",
  [
    ("<|endoftext|>", ENDOFTEXT, ENDOFTEXT),  # Qwen2.5-Math-1.5B (base)
    ("<|im_end|>", [IM_END, ENDOFTEXT], IM_END),  # Qwen2.5-1.5B-Instruct
  ],
)
def test_stop_tokens_are_the_union_of_eos_generation_config_and_end_of_turn(
    tmp_path, eos, generation_eos, tokenizer_eos):
  from transformers import AutoTokenizer

  path = _qwen25_dir(tmp_path / "qwen", eos=eos, generation_eos=generation_eos)
  tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  assert tok.eos_token_id == tokenizer_eos  # what rollouts stopped on before
  assert end_of_turn_id(tok) == IM_END
  # End of turn first (the token a chat completion is written with), then the others.
  assert stop_token_ids(tok, path, config_eos=ENDOFTEXT) == (IM_END, ENDOFTEXT)
  assert stop_token_ids(tok) == tuple(dict.fromkeys((IM_END, tokenizer_eos)))


def test_grpo_dpo_codec_and_grace_use_the_union(tmp_path):
  from transformers import AutoTokenizer

  path = _qwen25_dir(tmp_path / "qwen", eos="<|endoftext|>", generation_eos=ENDOFTEXT)
  config = grpo_config.get_config("test")
  config.unlock()
  config.model.update(source="hf", path=str(path))
  config.task.update(style="chat")
  codec = policy_setup.make_codec(config)
  assert codec.eos_ids == (IM_END, ENDOFTEXT)
  assert codec.encode_completion("7")[-1] == IM_END  # a chat turn ends with <|im_end|>
  assert codec.decode([ord("7") - 32 + 1, IM_END, ord("8") - 32 + 1]) == "7"
  tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  dcfg = types.SimpleNamespace(eos_token_id=ENDOFTEXT)
  assert eos_ids(tok, dcfg, path) == (IM_END, ENDOFTEXT)
