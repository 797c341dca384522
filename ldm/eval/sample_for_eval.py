"""Generate numbered samples into a folder, resumably and reproducibly, for evaluation.

Sample `i` is written to `outdir/{i:06d}.png`. Its starting noise x_T is drawn from its own
generator seeded by (seed, i), and its class label (class-conditional models) is
`i % n_classes` (class-uniform for n a multiple of n_classes). Rank r of W (torchrun's RANK /
WORLD_SIZE) takes indices r, r+W, r+2W, ... in batches of `batch_size`, so ranks never overlap.

Resume: a batch whose PNGs all exist is skipped; otherwise it is regenerated from the same
seeds and only its missing PNGs are written (atomically: temp file + rename). Before each batch
torch's global RNG is seeded from (seed, first index of the batch), so the noise a stochastic
sampler draws inside (DDIM eta > 0) is the same as in an uninterrupted run with the same
batch size and world size; with eta = 0 each sample depends on its own seed only.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ldm.eval.image_metrics import to_uint8

logger = logging.getLogger(__name__)

# sample_fn(x_T (B, C, h, w), labels (B,) long or None) -> images in [-1, 1], (B, 3, H, W)
SampleFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
MANIFEST = "eval_manifest.json"


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for (run seed, sample index, stream)."""
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def sample_path(outdir: Path, index: int) -> Path:
    return outdir / f"{index:06d}.png"


def rank_indices(n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Indices of rank `rank`: r, r+W, r+2W, ... below n."""
    return list(range(rank, n, world_size))


def class_labels(indices: Sequence[int], n_classes: Optional[int]) -> Optional[torch.Tensor]:
    if not n_classes:
        return None
    return torch.tensor([i % n_classes for i in indices], dtype=torch.long)


def initial_noise(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """x_T for each index from its own generator (independent of batching and device)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, i)))
                        for i in indices])


def write_png(path: Path, image_hwc_uint8: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.stem}.tmp.png")
    Image.fromarray(image_hwc_uint8).save(tmp)
    os.replace(tmp, path)


def read_samples(outdir: str | Path, n: int) -> list[Path]:
    """Paths of samples 0..n-1; raises listing what is missing."""
    outdir = Path(outdir)
    paths = [sample_path(outdir, i) for i in range(n)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {n} samples missing in {outdir} (e.g. {missing[:5]})")
    return paths


@dataclass
class SamplingPlan:
    n: int                            # total number of samples over all ranks
    outdir: str                       # where the PNGs go
    shape: tuple                      # shape of one x_T, (C, h, w)
    batch_size: int = 50              # samples per sampler call
    seed: int = 0                     # run seed; sample i uses sample_seed(seed, i)
    n_classes: Optional[int] = None   # class-conditional: label of sample i is i % n_classes
    rank: int = 0                     # this process's rank (torchrun RANK)
    world_size: int = 1               # number of processes (torchrun WORLD_SIZE)
    protocol: dict = field(default_factory=dict)  # sampler settings etc., checked on resume

    def batches(self) -> list[list[int]]:
        idx = rank_indices(self.n, self.rank, self.world_size)
        return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]


def check_manifest(plan: SamplingPlan, force: bool = False) -> None:
    """Refuse to resume into a folder written with another protocol (seed, sampler, ...)."""
    outdir = Path(plan.outdir)
    path = outdir / MANIFEST
    mine = {"seed": plan.seed, "shape": list(plan.shape), "n_classes": plan.n_classes, "protocol": plan.protocol,
            "batch_size": plan.batch_size, "world_size": plan.world_size}
    if path.is_file():
        old = json.loads(path.read_text())
        for k in ("seed", "shape", "n_classes", "protocol"):
            if old.get(k) != mine[k] and not force:
                raise RuntimeError(f"{outdir} holds samples made with {k}={old.get(k)!r}, now {mine[k]!r}; "
                                   "use another --outdir (or --force to mix them)")
        for k in ("batch_size", "world_size"):
            if old.get(k) != mine[k]:
                logger.warning("resuming with %s=%s (was %s): stochastic samplers draw different in-loop noise",
                               k, mine[k], old.get(k))
    if plan.rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(mine, indent=1, default=str))
        os.replace(tmp, path)


def generate(sample_fn: SampleFn, plan: SamplingPlan, device: str | torch.device = "cpu",
             progress: bool = True, force: bool = False) -> dict[str, int]:
    """Fill `plan.outdir` with this rank's samples; returns counts of kept / written samples."""
    from tqdm import tqdm

    outdir = Path(plan.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    check_manifest(plan, force)
    batches = plan.batches()
    done = {i for b in batches for i in b if sample_path(outdir, i).is_file()}
    todo = [b for b in batches if not all(i in done for i in b)]
    total, kept, written = sum(len(b) for b in batches), len(done), 0
    bar = tqdm(total=total, initial=kept, desc=f"sampling (rank {plan.rank})", unit="img", disable=not progress)
    for b in todo:
        torch.manual_seed(sample_seed(plan.seed, b[0], stream=1))
        x_T = initial_noise(b, plan.shape, plan.seed).to(device)
        labels = class_labels(b, plan.n_classes)
        images = sample_fn(x_T, None if labels is None else labels.to(device))
        images = to_uint8(images.detach().cpu()).permute(0, 2, 3, 1).numpy()
        for i, im in zip(b, images):
            p = sample_path(outdir, i)
            if not p.is_file():
                write_png(p, im)
                written += 1
                bar.update(1)
    bar.close()
    return {"kept": kept, "written": written, "total_this_rank": total}


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# ------------------------------------------------------------------------------------------
# The LatentDiffusion sampling function (model, samplers and checkpoint code imported lazily)
# ------------------------------------------------------------------------------------------
@dataclass
class SamplerSettings:
    sampler: str = "ddim"             # a name of ldm.sampling.registry (ddim, plms, dpm, ddpm, euler, ...)
    steps: int = 200                  # sampler steps (ignored by ddpm: all training steps)
    eta: float = 1.0                  # DDIM eta (0 = deterministic)
    scale: float = 1.0                # classifier-free guidance scale (1 = off)
    uncond_label: Optional[int] = None  # class id of the "null" class for guidance (cin256-v2: 1000)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_class_info(model: Any) -> Optional[int]:
    """Number of class ids of a class-conditional LatentDiffusion (ClassEmbedder), else None."""
    emb = getattr(model, "cond_stage_model", None)
    if emb is None or type(emb).__name__ != "ClassEmbedder":
        return None
    return int(emb.embedding.num_embeddings)


def latent_shape(model: Any) -> tuple[int, int, int]:
    """(C, h, w) of the model's training-size samples (the one definition: ldm.scripting.latent_shape)."""
    from ldm.scripting import latent_shape as shape_of
    return shape_of(model)


def make_ldm_sample_fn(model: Any, settings: SamplerSettings) -> SampleFn:
    """sample_fn for a LatentDiffusion with any sampler of `ldm.sampling.registry` (draws from the
    global torch RNG, which the resumable loop seeds per batch)."""
    from ldm.sampling import registry

    name = settings.sampler.lower()
    spec = registry.get(name)

    def cond(labels: Optional[torch.Tensor]) -> Any:
        return None if labels is None else model.get_learned_conditioning({model.cond_stage_key: labels})

    @torch.no_grad()
    def sample_fn(x_T: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        with getattr(model, "ema_scope", contextlib.nullcontext)():
            c, uc = cond(labels), None
            if settings.scale != 1.0:
                if labels is None or settings.uncond_label is None:
                    raise ValueError("guidance scale != 1 needs a class-conditional model and an uncond_label")
                uc = cond(torch.full_like(labels, settings.uncond_label))
            options = {"clip_denoised": bool(getattr(model, "clip_denoised", False))} \
                if "clip_denoised" in spec.defaults else {}
            z = registry.sample(name, model, x_T, settings.steps, cond=c, uncond=uc,
                                scale=settings.scale, eta=settings.eta if spec.uses_eta else 0.0, **options)
            return model.decode_first_stage(z).clamp(-1, 1)

    return sample_fn


def load_ldm(config_path: str, ckpt: str, device: str | torch.device) -> Any:
    """Build the model of a YAML config and load the checkpoint strictly, in eval mode on `device`
    (the one load path of the sampling scripts: ldm.scripting.load_model)."""
    from ldm.scripting import load_model
    return load_model(config_path, ckpt, device)