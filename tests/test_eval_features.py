"""Inception weights are read from local files only; random weights are built and flagged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.eval import features as F


@pytest.fixture
def hub(tmp_path, monkeypatch):
    # set_dir pins torch.hub's private override; restore it (not get_dir()) so later tests
    # still follow TORCH_HOME.
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield tmp_path / "hub" / "checkpoints"


def test_missing_weights_error_names_the_file_and_where_to_put_it(hub):
    with pytest.raises(F.InceptionWeightsNotFound) as e:
        F.InceptionFeatures()
    msg = str(e.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and str(hub) in msg and "--random-inception" in msg
    with pytest.raises(F.InceptionWeightsNotFound, match="does not exist"):
        F.InceptionFeatures(weights_path=str(hub / "nope.pth"))


def test_local_weights_file_is_found_loaded_strictly_and_recorded(hub):
    rand = F.InceptionFeatures(random_weights=True, seed=5)
    assert rand.provenance["weights"] == "RANDOM" and rand.cache_id == "inception-RANDOM-seed5"
    hub.mkdir(parents=True)
    path = hub / "pt_inception-2015-12-05-6726825d.pth"   # pytorch-fid's name is accepted too
    torch.save(rand.model.state_dict(), path)
    real = F.InceptionFeatures()
    assert real.provenance["weights"] == str(path) and real.provenance["sha256_matches_release"] is False
    assert real.cache_id.startswith("inception-") and "RANDOM" not in real.cache_id
    imgs = np.random.RandomState(0).randint(0, 256, (2, 40, 40, 3)).astype(np.uint8)
    a, b = rand(imgs), real(torch.from_numpy(imgs).permute(0, 3, 1, 2))   # HWC and CHW batches
    assert a[F.POOL].shape == (2, 2048) and a[F.LOGITS].shape == (2, 1008)
    np.testing.assert_allclose(a[F.POOL], b[F.POOL], rtol=1e-5, atol=1e-6)
    assert np.abs(a[F.POOL][0] - a[F.POOL][1]).max() > 1e-4       # random features still tell images apart
    with pytest.raises(TypeError, match="uint8"):
        rand(imgs.astype(np.float32))
