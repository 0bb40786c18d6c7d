"""What an installed (non-editable) wheel needs: every package directory is
a regular package, so setuptools' package discovery includes it."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_source_directory_is_a_package():
  missing = []
  for top in ("sparse_attn", "kernels_pallas"):
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
      dirnames[:] = [d for d in dirnames if d != "__pycache__"]
      if any(f.endswith(".py") for f in filenames) and (
        "__init__.py" not in filenames
      ):
        missing.append(os.path.relpath(dirpath, ROOT))
  assert not missing, f"directories without __init__.py: {missing}"
