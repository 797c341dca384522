"""notebooks/*.ipynb execute top to bottom (nbclient) on tiny random-weight checkpoints built from
the same configs, and end by showing the grid of samples."""
from __future__ import annotations

import base64
import io

import pytest

from conftest import ROOT
from test_scripts_common import tiny  # noqa: F401

NOTEBOOKS = {
    # notebook: (config it loads, samples in the grid, grid columns)
    "cin256_class_conditional": ("configs/ldm/cin256.yaml", 4 * 2, 2),
    "sd_txt2img": ("configs/stable-diffusion/v1-inference.yaml", 2, 2),
}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_executes(name, tiny, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from PIL import Image
    config, n_images, columns = NOTEBOOKS[name]
    cfg, ckpt = tiny(config, "safetensors")
    for key, value in {"LDM_NOTEBOOK_CKPT": ckpt, "LDM_NOTEBOOK_CONFIG": cfg, "LDM_NOTEBOOK_N": 2,
                       "LDM_NOTEBOOK_STEPS": 3, "OMP_NUM_THREADS": 1, "CUDA_VISIBLE_DEVICES": ""}.items():
        monkeypatch.setenv(key, str(value))
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    last = nb.cells[-1].outputs
    pngs = [o["data"]["image/png"] for o in last if "image/png" in o.get("data", {})]
    assert len(pngs) == 1, f"the last cell of {name} shows no image: {last}"
    grid = Image.open(io.BytesIO(base64.b64decode(pngs[0])))
    side = 32 if "cin256" in name else 64                       # tiny models: latent side 8, f = 4 / 8
    rows = n_images // columns
    assert grid.size == (2 + columns * (side + 2), 2 + rows * (side + 2))
