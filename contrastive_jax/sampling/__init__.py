"""Pure, jit-able samplers: `fn(apply_fn, params, inputs, rng, *, settings)` with static shapes."""

from contrastive_jax.sampling.ddpm import sample_ancestral, sample_ddim
from contrastive_jax.sampling.engine import Engine, EngineSpec, generate_groups
from contrastive_jax.sampling.flow import flow_matching_batch, sample_ode, sample_sde
from contrastive_jax.sampling.lm import generate, sequence_logprobs
from contrastive_jax.sampling.meanflow import meanflow_batch, sample_meanflow, sample_time_pairs
from contrastive_jax.sampling.prompts import init_prompt_state, select_prompts, update_prompt_state

__all__ = [
  "Engine",
  "EngineSpec",
  "flow_matching_batch",
  "generate",
  "generate_groups",
  "init_prompt_state",
  "meanflow_batch",
  "sample_ancestral",
  "sample_ddim",
  "sample_meanflow",
  "sample_ode",
  "sample_sde",
  "sample_time_pairs",
  "select_prompts",
  "sequence_logprobs",
  "update_prompt_state",
]
