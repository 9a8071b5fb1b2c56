"""The runtime needs only what pyproject.toml declares. A subprocess sees a site-packages made of
the declared dependencies and everything they require, nothing else (no torch, and none of what
torch alone brings, such as jinja2, which transformers' chat templates need); there every module
imports and every offline preset builds its data pipeline, chat templates included. A package the
code imports but pyproject.toml does not declare fails here, as it would after `pip install -e .`.
"""

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def declared_closure() -> set[str]:
  """Canonical names of the distributions `pip install -e .` brings: the declared dependencies
  and, recursively, what they require (with the extras asked for; no optional extras)."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    todo = [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]
  seen: dict[str, set[str]] = {}
  while todo:
    req = todo.pop()
    name = _canonical(req.name)
    extras = set(req.extras)
    if name in seen and extras <= seen[name]:
      continue
    seen[name] = seen.get(name, set()) | extras
    try:
      requires = md.distribution(name).requires or []
    except md.PackageNotFoundError:
      continue  # declared but absent here (e.g. a platform-specific wheel)
    for text in requires:
      sub = Requirement(text)
      if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in seen[name] | {""}):
        todo.append(sub)
  return set(seen)


def runtime_site(tmp_path) -> str:
  """A directory of symlinks to the installed files of `declared_closure()` only."""
  site = tmp_path / "site"
  site.mkdir()
  wanted = declared_closure()
  for dist in md.distributions():
    if _canonical(dist.metadata["Name"]) not in wanted:
      continue
    base = dist.locate_file("")
    for top in {str(f).split("/")[0] for f in dist.files or () if not str(f).startswith("..")}:
      if not (site / top).exists() and os.path.exists(os.path.join(base, top)):
        (site / top).symlink_to(os.path.join(base, top))
  return str(site)


WORKER = textwrap.dedent(
  """
  import site, sys
  site.addsitedir(SITE)  # the declared closure only (python -S: no other site-packages)
  sys.path.insert(0, ROOT)
  import importlib, importlib.util, json, os, pkgutil

  import configs, contrastive_jax, experiments
  import launch  # noqa: F401
  for package in (configs, contrastive_jax, experiments):
    for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
      importlib.import_module(m.name)

  from contrastive_jax import sharding
  def first(batches):
    batch = next(iter(batches))
    return sorted(batch)

  built = {}
  from configs.contrastive_digits import get_config as digits_config
  from contrastive_jax.data.digits import load_digits
  from contrastive_jax.data.pipeline import array_batches
  c = digits_config("test")
  built["contrastive_digits:test"] = first(
    array_batches({"image": load_digits("train")["image"]}, batch_size=c.train.batch_size, seed=0))

  from configs.dispersive import get_config as dispersive_config
  from experiments import dispersive
  built["dispersive:test"] = first(dispersive._data(dispersive_config("test")))

  from configs.grpo import get_config as grpo_config
  from experiments import policy_setup
  c = grpo_config("test")
  task, _ = policy_setup.make_tasks(c)
  built["grpo:test"] = [a.shape for a in task.prompt_arrays(policy_setup.make_codec(c))]

  from configs.dpo import get_config as dpo_config
  from experiments import dpo
  c = dpo_config("test")
  train_pairs, _ = dpo._pairs(c, policy_setup.make_codec(c))
  built["dpo:test"] = sorted(train_pairs)

  # Chat templates (transformers' apply_chat_template needs jinja2; smollm2_arith, grace and
  # dpo:jsonl render them, the first two through the GGUF's template, the same code path).
  from contrastive_jax.data import grace as grace_data
  from contrastive_jax.data.policy_tasks import HFCodec
  tok = grace_data.tiny_chat_tokenizer()
  ids = HFCodec(tok, chat=True, eos_ids=[tok.eos_token_id or 0]).encode_prompt("1+2=")
  built["chat_template"] = len(ids)
  from configs.grace import get_config as grace_config
  from experiments import grace
  c = grace_config("test")
  triplets = grace.train_triplets(c, grace.offline_records(c))
  texts = [t["query"] for t in triplets[:4]]
  arrays = grace_data.chat_prompts(grace.make_tokenizer(c), texts, max_text_tokens=16)
  built["grace:test"] = sorted(arrays)
  from configs.seal import get_config as seal_config
  from experiments import seal
  records = seal._records(seal_config("test"), "train")
  built["seal:test"] = len(seal._pairs(records)[0])

  assert "torch" not in sys.modules
  print(json.dumps(built, default=str))
  """
)


def test_the_closure_leaves_out_the_extras():
  closure = declared_closure()
  assert {"jax", "transformers", "jinja2", "etils", "numpy"} <= closure
  assert not {"torch", "torchvision", "sentence-transformers", "pytest"} & closure


def test_every_module_and_offline_pipeline_runs_with_only_the_declared_dependencies(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  code = f"SITE = {runtime_site(tmp_path)!r}\nROOT = {ROOT!r}\n" + WORKER
  proc = subprocess.run(
    [sys.executable, "-S", "-c", code],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  built = json.loads(proc.stdout.strip().splitlines()[-1])
  for name in (
    "contrastive_digits:test",
    "dispersive:test",
    "grpo:test",
    "dpo:test",
    "grace:test",
    "seal:test",
    "chat_template",
  ):
    assert built.get(name), (name, built)
  assert built["dispersive:test"] == ["image", "label"]
