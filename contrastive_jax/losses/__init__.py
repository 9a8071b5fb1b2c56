"""Pure loss functions: `fn(arrays..., *, hyper-parameters, axis_name=None) -> (loss, metrics)`."""

from contrastive_jax.losses.contrastive import info_nce
from contrastive_jax.losses.dispersive import dispersive_loss
from contrastive_jax.losses.grace import grace_reward, grace_unsupervised_reward
from contrastive_jax.losses.meanflow import guided_velocity, meanflow_loss, meanflow_target
from contrastive_jax.losses.policy import dpo_loss, group_advantages, overlong_penalty, policy_loss
from contrastive_jax.losses.repa import repa_loss
from contrastive_jax.losses.seal import seal_loss

__all__ = [
  "dispersive_loss",
  "dpo_loss",
  "grace_reward",
  "grace_unsupervised_reward",
  "group_advantages",
  "guided_velocity",
  "info_nce",
  "meanflow_loss",
  "meanflow_target",
  "overlong_penalty",
  "policy_loss",
  "repa_loss",
  "seal_loss",
]
