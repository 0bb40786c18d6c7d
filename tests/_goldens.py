"""The HF goldens (tests/goldens/) and the comparisons the HF tests share."""

import os

import numpy as np
from flax import nnx

from sparse_attn.hf.safetensors_io import CheckpointTensors

GOLDENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens")


def golden_case(name):
  """(checkpoint directory, its reference.npz) of golden case `name`."""
  path = os.path.join(GOLDENS, name)
  return path, np.load(os.path.join(path, "reference.npz"))


def param_arrays(model):
  """{parameter path: numpy array} of a model."""
  return {
    p: np.asarray(v.get_value())
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def assert_same_params(a, b):
  """Two models hold the same parameters, bit for bit."""
  pa, pb = param_arrays(a), param_arrays(b)
  assert set(pa) == set(pb)
  for p, x in pa.items():
    np.testing.assert_array_equal(x, pb[p], err_msg=str(p))


def assert_same_tensors(path_a, path_b, *, dtypes=False):
  """Two checkpoint directories hold the same tensors (and, with dtypes,
  stored in the same dtypes), bit for bit."""
  a, b = CheckpointTensors(path_a), CheckpointTensors(path_b)
  assert set(a) == set(b)
  for name in a:
    if dtypes:
      assert a.dtype(name) == b.dtype(name), name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
