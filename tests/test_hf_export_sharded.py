"""HF safetensors export of mesh-sharded parameters: gathered first, written by process 0."""

import jax
import jax.numpy as jnp
import numpy as np
import tiny

from contrastive_jax.models.encoder import Encoder
from contrastive_jax.sharding import logical_shardings, make_mesh
from contrastive_jax.weights import encoder as W
from contrastive_jax.weights.hf import load_tensors


def test_fsdp_sharded_encoder_exports_the_same_tensors(tmp_path, monkeypatch):
  cfg = tiny.encoder(max_position_embeddings=16, vocab_size=64)
  ids = jnp.zeros((1, 4), jnp.int32)
  init = lambda: Encoder(cfg).init(jax.random.key(0), ids, jnp.ones_like(ids))
  mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  host = jax.device_get(init())
  boxed = jax.device_put(host, logical_shardings(jax.eval_shape(init), mesh))
  leaves = jax.tree.leaves(boxed)
  assert any(x.addressable_shards[0].data.size < x.size for x in leaves)  # really sharded
  W.save_encoder(tmp_path / "sharded", boxed, cfg)
  W.save_encoder(tmp_path / "host", host, cfg)
  got, want = load_tensors(tmp_path / "sharded"), load_tensors(tmp_path / "host")
  assert sorted(got) == sorted(want) and len(got) > 10
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  # Another process gathers (the collective) but writes nothing.
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  W.save_encoder(tmp_path / "other", boxed, cfg)
  assert not (tmp_path / "other").exists()
