"""Inception-V3 features for FID / IS / KID / precision-recall, read from local weights only.

The network is torch-fidelity's `FeatureExtractorInceptionV3` (the TF-2015 Inception graph
ported to PyTorch, with TF1-exact bilinear resizing to 299x299), so our features equal those
of `torch-fidelity` and `pytorch-fid`. Weights are never downloaded: they are looked up in
`weights_path`, `$LDM_INCEPTION_WEIGHTS`, and torch's hub cache (`$TORCH_HOME/hub/checkpoints`),
under torch-fidelity's or pytorch-fid's file name; when none is found the error names the file
and where to put it.

`random_weights=True` builds the same architecture with seeded He-normal weights for offline
smoke tests. Every result computed with it carries `RANDOM_WEIGHTS_NOTE`.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union
from unittest import mock

import numpy as np
import torch

# torch-fidelity's and pytorch-fid's names for the same converted TF weights (sha256 6726825d...).
INCEPTION_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
RANDOM_WEIGHTS_NOTE = "features: RANDOM-WEIGHT Inception — numbers are not comparable to the paper"

# Feature layers: pool3 (2048-d) for FID/KID/PR, unbiased logits (1008-d, no bias) for IS.
POOL, LOGITS = "2048", "logits_unbiased"


class InceptionWeightsNotFound(FileNotFoundError):
    """No local Inception weights; the message names the file and where to put it."""


def inception_search_paths(weights_path: Optional[str] = None) -> list[Path]:
    """Candidate weight files, in lookup order."""
    cands: list[Path] = []
    for p in (weights_path, os.environ.get("LDM_INCEPTION_WEIGHTS")):
        if p:
            cands.append(Path(p).expanduser())
    hub_dirs = [Path(torch.hub.get_dir()) / "checkpoints"]
    if os.environ.get("TORCH_HOME"):
        hub_dirs.append(Path(os.environ["TORCH_HOME"]).expanduser() / "hub" / "checkpoints")
    hub_dirs.append(Path("~/.cache/torch/hub/checkpoints").expanduser())
    for d in dict.fromkeys(hub_dirs):
        cands += [d / name for name in INCEPTION_FILENAMES]
    return cands


def find_inception_weights(weights_path: Optional[str] = None) -> Path:
    """The first existing candidate, or `InceptionWeightsNotFound` with instructions."""
    if weights_path and not Path(weights_path).expanduser().is_file():
        raise InceptionWeightsNotFound(f"Inception weights file '{weights_path}' (given explicitly) does not exist.")
    cands = inception_search_paths(weights_path)
    for p in cands:
        if p.is_file():
            return p
    where = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAMES[0]
    raise InceptionWeightsNotFound(
        f"Inception-V3 FID weights not found (nothing is downloaded at runtime). Put the file "
        f"'{INCEPTION_FILENAMES[0]}' (from {INCEPTION_URL}; pytorch-fid's '{INCEPTION_FILENAMES[1]}' works too) at\n"
        f"  {where}\nor pass --inception-weights PATH / set LDM_INCEPTION_WEIGHTS. Looked in:\n  "
        + "\n  ".join(str(c) for c in cands)
        + "\nFor an offline smoke test only, use --random-inception (numbers then mean nothing).")


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_RANDOM = object()  # sentinel handed to the constructor instead of a state dict
_NETWORKS: dict[tuple, torch.nn.Module] = {}  # built networks, reused within a process (they are frozen)


def _inception_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomWeightInceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's Inception with seeded He-normal weights instead of the TF ones."""

        seed = 0

        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: D401
            if state_dict is not _RANDOM:
                return super().load_state_dict(state_dict, strict=strict, assign=assign)
            g = torch.Generator().manual_seed(self.seed)
            for m in self.modules():
                if isinstance(m, torch.nn.Conv2d):
                    fan_in = m.weight[0].numel()
                    m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                elif isinstance(m, torch.nn.BatchNorm2d):
                    m.reset_parameters()  # identity affine, running mean 0 / var 1
                elif isinstance(m, torch.nn.Linear):
                    m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                    m.bias.data.zero_()
            return None

    return FeatureExtractorInceptionV3, RandomWeightInceptionV3


@dataclass
class InceptionFeatures:
    """Batched feature extraction from uint8 images.

    Call `extract(batches)` with an iterable of uint8 arrays/tensors, each (B, H, W, 3) or
    (B, 3, H, W); it returns {"2048": (N, 2048) float64, "logits_unbiased": (N, 1008) float64}.
    """

    weights_path: Optional[str] = None   # explicit weights file (else env / torch hub cache lookup)
    random_weights: bool = False         # build with random weights (offline smoke tests only)
    device: Union[str, torch.device] = "cpu"
    seed: int = 0                        # seed of the random weights
    model: torch.nn.Module = field(init=False, repr=False)
    provenance: dict = field(init=False)

    def __post_init__(self) -> None:
        import torch_fidelity
        import torch_fidelity.feature_extractor_inceptionv3 as tfi

        base_cls, random_cls = _inception_class()
        feats = [POOL, LOGITS]
        if self.random_weights:
            key = ("random", self.seed, str(self.device))
            if key not in _NETWORKS:
                random_cls.seed = self.seed
                with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: _RANDOM):
                    _NETWORKS[key] = random_cls("inception-v3-compat-random", feats).to(self.device).eval()
            self.provenance = {"network": "torch-fidelity FeatureExtractorInceptionV3", "weights": "RANDOM",
                               "random_seed": self.seed, "note": RANDOM_WEIGHTS_NOTE}
        else:
            path = find_inception_weights(self.weights_path)
            sha = file_sha256(path)
            key = (sha, str(self.device))
            if key not in _NETWORKS:
                net = base_cls("inception-v3-compat", feats, feature_extractor_weights_path=str(path))
                _NETWORKS[key] = net.to(self.device).eval()
            self.provenance = {"network": "torch-fidelity FeatureExtractorInceptionV3", "weights": str(path),
                               "sha256": sha, "sha256_matches_release": sha.startswith(INCEPTION_SHA256_PREFIX)}
        self.model = _NETWORKS[key]
        self.provenance["torch_fidelity"] = torch_fidelity.__version__

    @property
    def cache_id(self) -> str:
        """Identifies the feature network in reference-statistics cache keys."""
        if self.random_weights:
            return f"inception-RANDOM-seed{self.seed}"
        return f"inception-{self.provenance['sha256'][:16]}"

    @torch.no_grad()
    def __call__(self, images: Union[np.ndarray, torch.Tensor]) -> dict[str, np.ndarray]:
        x = to_uint8_nchw(images).to(self.device)
        pool, logits = self.model(x)
        return {POOL: pool.double().cpu().numpy(), LOGITS: logits.double().cpu().numpy()}

    def extract(self, batches: Iterable[Union[np.ndarray, torch.Tensor]], progress: bool = False,
                desc: str = "features") -> dict[str, np.ndarray]:
        from tqdm import tqdm

        out: dict[str, list] = {POOL: [], LOGITS: []}
        with tqdm(desc=desc, unit="img", disable=not progress) as bar:
            for b in batches:
                for k, v in self(b).items():
                    out[k].append(v)
                bar.update(len(b))
        if not out[POOL]:
            raise ValueError("no images to extract features from")
        return {k: np.concatenate(v) for k, v in out.items()}


def to_uint8_nchw(images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 (B,H,W,3) or (B,3,H,W) -> uint8 tensor (B,3,H,W). Grayscale (B,H,W,1) is repeated."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype} (convert with ldm.eval.image_metrics.to_uint8)")
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (B,H,W,C) or (B,C,H,W), got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.contiguous()


def batched(items: Iterable, n: int) -> Iterator[list]:
    buf: list = []
    for it in items:
        buf.append(it)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


SPATIAL = "mixed_6_conv_7"   # sFID features (Nash et al. 2021)


class InceptionSpatialFeatures(InceptionFeatures):
    """sFID features (Nash et al. 2021, as guided-diffusion's evaluator): the first 7 channels of
    the TF graph's `mixed_6/conv` (= torch-fidelity's Mixed_6d.branch1x1 output, after its ReLU),
    17 x 17 x 7 = 2023 values per image, for a Fréchet distance like FID's."""

    feature_key = SPATIAL

    def __post_init__(self) -> None:
        super().__post_init__()
        self._captured: list[torch.Tensor] = []
        self.provenance = {**self.provenance, "layer": "Mixed_6d.branch1x1[:, :7] (mixed_6/conv)"}

    @property
    def cache_id(self) -> str:
        return "spatial-" + super().cache_id

    @torch.no_grad()
    def __call__(self, images: Union[np.ndarray, torch.Tensor]) -> dict[str, np.ndarray]:
        hook = self.model.Mixed_6d.branch1x1.register_forward_hook(
            lambda m, i, o: self._captured.append(o[:, :7].permute(0, 2, 3, 1).flatten(1)))
        try:
            self.model(to_uint8_nchw(images).to(self.device))
        finally:
            hook.remove()
        f = self._captured.pop()
        self._captured.clear()
        return {SPATIAL: f.double().cpu().numpy()}

    def extract(self, batches: Iterable[Union[np.ndarray, torch.Tensor]], progress: bool = False,
                desc: str = "features") -> dict[str, np.ndarray]:
        out = [self(b)[SPATIAL] for b in batches]
        if not out:
            raise ValueError("no images to extract features from")
        return {SPATIAL: np.concatenate(out)}
