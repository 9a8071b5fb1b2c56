"""Metrics and evaluators; the ADM suite's two feature-level metrics are importable from here."""

from contrastive_jax.evaluation.adm import inception_score, precision_recall

__all__ = ["inception_score", "precision_recall"]
