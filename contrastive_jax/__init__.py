"""contrastive_jax: JAX/Flax code for dispersive loss, GRPO/2-GRPO/DPO, SEAL and GRACE."""

import logging as _logging


class _NoTorchNotice(_logging.Filter):
  """`transformers` says "PyTorch was not found..." on import when torch is absent; here it serves
  tokenizers and configs only (the models are ours), so the notice is noise on every run. The
  filter sits on its logger before any import of it, and drops that one message."""

  def filter(self, record):
    return not record.getMessage().startswith("PyTorch was not found")


_logging.getLogger("transformers").addFilter(_NoTorchNotice())
