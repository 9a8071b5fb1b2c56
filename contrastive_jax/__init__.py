"""contrastive_jax: JAX/Flax code for dispersive loss, GRPO/2-GRPO/DPO, SEAL and GRACE."""
