"""examples/quickstart.ipynb runs headlessly (nbclient + ipykernel, Debian's python3-nbclient and
python3-ipykernel) without errors and shows at least one image."""

import json
import os
import sys

import pytest

import voken

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples", "quickstart.ipynb")


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # A kernel running this very interpreter with this very voken (not whatever "python3"
    # kernel a machine has installed).
    kernel_dir = tmp_path / "jupyter" / "kernels" / "voken-test"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "voken test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(voken.__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="voken-test",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # The input picture (a cell's value) and at least one generated image (display()).
    assert len(images) >= 2, [o.get("output_type") for o in outputs]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "random weights" in text
