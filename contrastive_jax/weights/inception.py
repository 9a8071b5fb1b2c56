"""pytorch-fid's Inception-v3 weights -> `contrastive_jax.models.inception.InceptionV3` params.

The weights file is the one pytorch-fid 0.3.0 downloads (FID_WEIGHTS_URL,
`pt_inception-2015-12-05-6726825d.pth`): the state dict of torchvision's `Inception3` with the FID
blocks (TensorFlow's 2015-12-05 graph). The user supplies it; nothing is downloaded. It is read
with `weights/torch_pickle.py` (no torch import, no arbitrary globals); a `.safetensors` or
`.npz` file, or an HF-style directory of safetensors, with the same state-dict keys works too.

Each `X.conv.weight` [out, in, kh, kw] and `X.bn.{weight, bias, running_mean, running_var}`
(eps 1e-3, torchvision's BasicConv2d) become one conv: kernel [kh, kw, in, out] =
W * gamma / sqrt(var + eps), bias = beta - mean * gamma / sqrt(var + eps), folded in float64.
`fc.weight` [1008, 2048] / `fc.bias` become the logits layer. `*.num_batches_tracked` is ignored.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from contrastive_jax.models.inception import InceptionV3
from contrastive_jax.weights.hf import WeightsError, load_tensors
from contrastive_jax.weights.torch_pickle import load_torch_state_dict

BN_EPS = 1e-3
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
_BN = ("weight", "bias", "running_mean", "running_var")


@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  # The layout does not depend on precision or image_size (the input is resized first).
  abstract = jax.eval_shape(
    InceptionV3().init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
  )
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract)["params"])
  return {k: tuple(v.shape) for k, v in flat.items()}


def _modules() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax module path -> kernel shape, for every conv and the classifier."""
  return {k[:-1]: v for k, v in _param_shapes().items() if k[-1] == "kernel"}


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """Every key of the pytorch-fid state dict (num_batches_tracked aside) and its torch shape."""
  out = {}
  for path, shape in _modules().items():
    prefix = ".".join(path)
    if path == ("fc",):
      out["fc.weight"], out["fc.bias"] = (shape[1], shape[0]), (shape[1],)
      continue
    kh, kw, cin, cout = shape
    out[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
    out.update({f"{prefix}.bn.{name}": (cout,) for name in _BN})
  return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Named arrays of a torch checkpoint, .safetensors or .npz file, or a safetensors directory."""
  path = Path(path)
  if path.is_dir():
    return load_tensors(path)
  if not path.is_file():
    raise WeightsError(
      f"{path}: no such file; pytorch-fid's Inception weights are {WEIGHTS_FILE} (its "
      f"FID_WEIGHTS_URL), downloaded by the user"
    )
  if path.suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
      raise WeightsError(f"{path}: cannot read the npz ({e})") from e
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file

    try:
      return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers
      raise WeightsError(f"{path}: cannot read safetensors ({e})") from e
  return load_torch_state_dict(path)


def params_from_state_dict(state: dict[str, np.ndarray], *, file: str = "<state dict>") -> dict:
  """{"params": ...} of `InceptionV3` (float32 numpy) from a pytorch-fid state dict.

  Raises WeightsError naming `file`, the key and both shapes for a missing key, an unexpected key
  or a wrong shape.
  """
  expected = state_dict_shapes()
  keys = {k for k in state if not k.endswith(".num_batches_tracked")}
  missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
  if missing or unexpected:
    raise WeightsError(
      f"{file}: not pytorch-fid's Inception-v3 state dict: missing keys {missing[:8]}"
      f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
      f"{' ...' if len(unexpected) > 8 else ''}"
    )
  for key, shape in expected.items():
    if tuple(np.shape(state[key])) != shape:
      raise WeightsError(
        f"{file}: {key} has shape {tuple(np.shape(state[key]))}, Inception-v3 needs {shape}"
      )
  get = {k: np.asarray(state[k], np.float64) for k in expected}
  flat = {}
  for path in _modules():
    prefix = ".".join(path)
    if path == ("fc",):
      flat[path + ("kernel",)] = get["fc.weight"].T
      flat[path + ("bias",)] = get["fc.bias"]
      continue
    gamma, beta, mean, var = (get[f"{prefix}.bn.{name}"] for name in _BN)
    if np.any(var + BN_EPS <= 0):
      raise WeightsError(f"{file}: {prefix}.bn.running_var has values <= -{BN_EPS}")
    scale = gamma / np.sqrt(var + BN_EPS)
    flat[path + ("kernel",)] = get[f"{prefix}.conv.weight"].transpose(2, 3, 1, 0) * scale
    flat[path + ("bias",)] = beta - mean * scale
  flat = {k: v.astype(np.float32) for k, v in flat.items()}
  return {"params": traverse_util.unflatten_dict(flat)}


def load_inception_params(path: str | os.PathLike) -> dict:
  """`InceptionV3` params {"params": ...} from pytorch-fid's weights file (see module docstring).

  Args:
    path: `pt_inception-2015-12-05-6726825d.pth` (torch zip or legacy), or a .safetensors /
      .npz file or safetensors directory with the same keys.

  Returns:
    Plain float32 numpy params with the BatchNorms folded into the convolutions.
  """
  return params_from_state_dict(read_state_dict(path), file=str(path))
