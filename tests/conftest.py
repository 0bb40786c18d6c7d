import os
import sys

import numpy as np
import pytest

# Test helpers (np_reference, _testutil) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng():
  return np.random.default_rng(0)
