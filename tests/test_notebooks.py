"""Executes every notebook in notebooks/ top to bottom at smoke sizes.

Each notebook reads SPARSE_ATTN_NB_SMOKE=1 and shrinks its sizes and step
counts so that it runs in well under a minute on a 2-core CPU. A cell that
raises fails the test with the cell's traceback. Notebooks are stored without
outputs; this test never writes them back.
"""

import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")  # provides the "python3" kernel spec

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_notebooks_exist():
  names = [p.name for p in NOTEBOOKS]
  assert names == [
    "01_lightning_indexer.ipynb",
    "02_train_small_dsa.ipynb",
    "03_sparse_families.ipynb",
    "04_reuse_in_your_model.ipynb",
    "05_deepseek_v32.ipynb",
  ], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
        f"{path.name} cell {i} has outputs; clear them before committing"
      )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
  monkeypatch.setenv("SPARSE_ATTN_NB_SMOKE", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": str(ROOT)}},
  )
  start = time.perf_counter()
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
  elapsed = time.perf_counter() - start
  errors = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
    if o.output_type == "error"
  ]
  assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
  print(f"{path.name}: {elapsed:.1f} s")
