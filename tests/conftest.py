import os
import sys

import numpy as np
import pytest

# Test helpers (np_reference, _testutil) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# The test extra installs libtpu (for the TPU compile tests). Without a TPU it
# is still loaded by every JAX process that probes backends, and by default
# only one process may hold it at a time; the suite starts subprocesses.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@pytest.fixture
def rng():
  return np.random.default_rng(0)
