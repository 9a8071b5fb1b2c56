"""The tiny models the tests share: one decoder and one encoder config, width 32, so a compile
takes seconds; a test overrides only what it is about (a switch, a vocabulary, a depth)."""

from contrastive_jax.models.decoder import DecoderConfig
from contrastive_jax.models.encoder import EncoderConfig

DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
               num_kv_heads=2, head_dim=8)  # Llama-style, GQA 4/2
ENCODER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64)  # BERT, MiniLM's vocabulary (its tokenizer fits)


def decoder(**overrides) -> DecoderConfig:
  return DecoderConfig(**{**DECODER, **overrides})


def encoder(**overrides) -> EncoderConfig:
  return EncoderConfig(**{**ENCODER, **overrides})
