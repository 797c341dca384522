"""What the sampling scripts (scripts/*.py) and notebooks share, so that they stay thin.

- command line: `add_common_args` (config, checkpoint, sampler, steps, eta, guidance scale,
  seed, batch, size, precision, device, output), `resolve_device`, `fail`, `clear_errors`;
- model: `load_model` (strict loading through `ldm.checkpoint`, hub encoders built with random
  weights because the checkpoint holds theirs), `downsampling_factor`, `latent_shape`;
- randomness: `seed_everything` returns the `torch.Generator` every sampler draws from, so a
  seed reproduces a sample (on any device: the generator lives on the CPU);
- sampling: `sample` runs any sampler of the registry (`ldm.sampling.registry`: DDIM, PLMS,
  DPM-Solver++, ancestral DDPM, the k-diffusion family) with classifier-free guidance and a
  tqdm bar; `--precision` opens `ldm.perf.autocast` (the one precision table);
- images: `load_image`, `load_mask`, `decode`, `to_uint8`, `SampleWriter` (numbered PNGs and
  a grid), `read_prompts`.

Bad inputs end in one clear message: `fail(msg)` raises SystemExit("error: msg"), which
Python prints without a traceback; `@cli` on a script's main does that for the library's
user-facing errors (a missing or mismatching checkpoint, missing hub files, a bad config).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Union

import numpy as np
import torch

from ldm.sampling import registry as sampler_registry

log = logging.getLogger(__name__)
Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

PRECISIONS = ("fp32", "bf16", "fp16")   # the --precision choices (ldm.perf.autocast's table reads them)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def fail(msg: str) -> NoReturn:
    """End the program with one message (no traceback)."""
    raise SystemExit(f"error: {msg}")


@contextlib.contextmanager
def clear_errors() -> Iterator[None]:
    """Turn the library's user-facing errors (missing / mismatching checkpoint, missing hub
    files, bad config) into `fail` messages; anything else keeps its traceback."""
    from ldm.checkpoint import CheckpointError, UnsafeCheckpointError
    from ldm.modules.encoders.hub import HubWeightsMissing
    from ldm.util import ConfigError
    try:
        yield
    except UnsafeCheckpointError as e:
        fail(f"{e} On the command line: --unsafe_pickle.")
    except (CheckpointError, HubWeightsMissing, ConfigError) as e:
        fail(str(e))


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of a script's main(argv): library errors meant for the user become `fail` messages."""
    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with clear_errors():
            return main(*args, **kwargs)
    return wrapped


def at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    """argparse `type=` that parses `kind` and refuses values below `low` (`--n_samples 0`, `--eta -1`)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_common_args(p: argparse.ArgumentParser, *, steps: int = 50, eta: float = 0.0, scale: float = 1.0,
                    n_samples: int = 4, outdir: str = "outputs/samples", config: Optional[str] = None,
                    size: bool = True, samplers: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The options every sampling script has (original spellings kept as aliases). `samplers`:
    the registered samplers a script can use (default: all of `ldm.sampling.registry`)."""
    samplers = tuple(samplers or sampler_registry.names())
    m = p.add_argument_group("model")
    m.add_argument("--config", default=config, help="model config (YAML, original format)")
    m.add_argument("--ckpt", help="checkpoint: Lightning .ckpt (weights under 'state_dict') or .safetensors")
    m.add_argument("--unsafe_pickle", action="store_true",
                   help="allow .ckpt files that pickle more than tensors (trusted files only: runs their code)")
    s = p.add_argument_group("sampling")
    s.add_argument("--sampler", choices=samplers, default="ddim", help=sampler_registry.help_text(samplers))
    s.add_argument("--plms", dest="sampler", action="store_const", const="plms", default=argparse.SUPPRESS,
                   help="= --sampler plms")
    s.add_argument("--dpm", dest="sampler", action="store_const", const="dpm", default=argparse.SUPPRESS,
                   help="= --sampler dpm")
    s.add_argument("--steps", "--ddim_steps", dest="steps", type=at_least(1), default=steps, help="sampling steps")
    s.add_argument("--eta", "--ddim_eta", dest="eta", type=at_least(0.0, float), default=eta,
                   help="DDIM eta (0: deterministic; 1: as stochastic as DDPM)")
    s.add_argument("--scale", type=float, default=scale,
                   help="classifier-free guidance: eps = eps(x, uncond) + scale * (eps(x, cond) - eps(x, uncond))")
    s.add_argument("--timestep_spacing", choices=sampler_registry.TIMESTEP_SPACINGS,
                   help="timesteps spaced as diffusers' schedulers do, for ddim / plms / dpm / the k-samplers "
                        "(default: the original's DDIM grid, DPM-Solver's time_uniform, --sigma_schedule)")
    s.add_argument("--sigma_schedule", choices=sampler_registry.SIGMA_SCHEDULES,
                   help="sigma spacing of the k-diffusion samplers (default: karras)")
    s.add_argument("--guidance_rescale", type=float,
                   help="rescale the guided prediction toward the conditional one's std (phi, Lin et al. 2024)")
    s.add_argument("--seed", type=int, default=42, help="seed of every random draw (same seed, same images)")
    s.add_argument("--n_samples", type=at_least(1), default=n_samples, help="batch size: samples per iteration")
    s.add_argument("--n_iter", type=at_least(1), default=1, help="number of iterations (batches)")
    if size:
        s.add_argument("--H", type=int, help="image height in pixels (default: the model's training size); "
                                             "larger sizes sample convolutionally")
        s.add_argument("--W", type=int, help="image width in pixels (default: the model's training size)")
    r = p.add_argument_group("output and runtime")
    r.add_argument("--outdir", default=outdir, help="samples/NNNNN.png and grid-NNNN.png go here")
    r.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    r.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or autocast to bf16 / fp16 on the model's device (fp16 on CPU falls back to fp32)")
    r.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
    return p


def resolve_device(name: Optional[str] = None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device '{name}' (use cpu, cuda, cuda:N, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def require_file(path: Optional[PathLike], what: str, hint: str = "") -> Path:
    if path is None:
        fail(f"no {what} given{hint}")
    p = Path(path)
    if not p.is_file() and not (what == "checkpoint" and p.is_dir()):   # a diffusers folder is a checkpoint too
        fail(f"{what} not found: '{p}'{hint}")
    return p


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------
def strip_ckpt_paths(node: Any) -> Any:
    """Drop every `ckpt_path` (first stages of training configs point at their own
    checkpoints; a full model checkpoint holds those weights too)."""
    if isinstance(node, dict):
        return {k: strip_ckpt_paths(v) for k, v in node.items() if k != "ckpt_path"}
    if isinstance(node, list):
        return [strip_ckpt_paths(v) for v in node]
    return node


def random_hub_weights() -> contextlib.AbstractContextManager:
    """Build CLIP / OpenCLIP text encoders without their pretrained files: the checkpoint
    loaded next holds their weights (as the released SD checkpoints do)."""
    from ldm import settings
    return settings.override(random_hub_weights=True)


def load_config(config: Union[PathLike, Mapping]) -> dict:
    """A config file (or an already loaded mapping) as a plain dict with a `model` section."""
    from omegaconf import OmegaConf
    if isinstance(config, Mapping) or OmegaConf.is_config(config):
        cfg, path = OmegaConf.to_container(OmegaConf.create(config), resolve=True), "the config"
    else:
        path = require_file(config, "config", " (pass --config)" if config is None else "")
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict) or "model" not in cfg:
        fail(f"config '{path}' has no top-level 'model' section")
    return cfg


def load_model(config: Union[PathLike, Mapping], ckpt: Optional[PathLike], device: Union[str, torch.device] = "cpu", *,
               unsafe_pickle: bool = False) -> torch.nn.Module:
    """Build the model of `config` and load `ckpt` strictly (.ckpt or .safetensors); eval mode on `device`."""
    from ldm.checkpoint import load_model_from_config
    from ldm.util import config_source
    cfg = load_config(config)
    ckpt_path = require_file(ckpt, "checkpoint", " (pass --ckpt)" if ckpt is None else
                             ". Download the weights and put them there, or pass --ckpt with the right path")
    log.info("Loading model from %s", ckpt_path)
    source = str(config) if isinstance(config, (str, os.PathLike)) else None
    with clear_errors(), config_source(source), random_hub_weights():
        return load_model_from_config(strip_ckpt_paths(cfg["model"]), ckpt_path, device=device,
                                      unsafe_pickle=unsafe_pickle)


def has_first_stage(model: Any) -> bool:
    return getattr(model, "first_stage_model", None) is not None


def downsampling_factor(model: Any) -> tuple[int, int]:
    """(f of the first stage, 2^levels of the UNet): image sides must be multiples of their product."""
    f = 2 ** int(getattr(model, "num_downs", 0)) if has_first_stage(model) else 1
    unet = model.model.diffusion_model
    return f, 2 ** (len(getattr(unet, "channel_mult", (1,))) - 1)


def image_size(model: Any) -> int:
    """The training image side in pixels (latent side x f)."""
    return int(model.image_size) * downsampling_factor(model)[0]


def check_size(model: Any, H: int, W: int, what: str = "--H/--W") -> None:
    f, u = downsampling_factor(model)
    if H <= 0 or W <= 0 or H % (f * u) or W % (f * u):
        fail(f"{what} = {H}x{W} must be positive multiples of the downsampling factor {f * u} "
             f"(first stage f={f} x UNet {u})")


def latent_shape(model: Any, H: Optional[int] = None, W: Optional[int] = None) -> tuple[int, int, int]:
    """(C, H / f, W / f) of the samples; H, W default to the training size."""
    H = H or image_size(model)
    W = W or image_size(model)
    check_size(model, H, W)
    f = downsampling_factor(model)[0]
    return int(model.channels), H // f, W // f


# ----------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------
def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (draws inside the model, e.g. a KL posterior sample) and
    return the CPU generator the samplers draw from (device-independent numbers)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    return torch.Generator("cpu").manual_seed(seed)


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------
def sampler_options(opt: argparse.Namespace) -> dict[str, Any]:
    """The sampler options given on the command line (those left unset take the registry's defaults)."""
    keys = ("timestep_spacing", "sigma_schedule", "guidance_rescale")
    return {k: getattr(opt, k) for k in keys if getattr(opt, k, None) is not None}


@torch.no_grad()
def sample(model: Any, sampler: str, steps: int, shape: Sequence[int], batch_size: int, cond: Any = None,
           uncond: Any = None, scale: float = 1.0, eta: float = 0.0, generator: Optional[torch.Generator] = None,
           x_T: Optional[Tensor] = None, progress: bool = True, desc: str = "Sampling", **options: Any) -> Tensor:
    """Latent samples (batch_size, *shape) with any registered sampler (`ldm.sampling.registry`),
    guided by `scale` when `uncond` is given; `options` are the sampler's (timestep_spacing, ...)."""
    from tqdm.auto import tqdm
    if sampler not in sampler_registry.SAMPLERS:
        fail(f"unknown sampler '{sampler}' (choose from {', '.join(sampler_registry.names())})")
    spec = sampler_registry.get(sampler)
    if sampler == "plms" and eta != 0:
        fail(f"--sampler plms needs --eta 0 (got {eta})")
    if steps < 1 and not spec.fixed_steps:
        fail(f"--steps must be at least 1 (got {steps})")
    unknown = set(options) - set(spec.defaults)
    if unknown:
        fail(f"--sampler {sampler} takes no {', '.join('--' + k for k in sorted(unknown))}")
    if uncond is None or scale == 1.0:
        uncond, scale = None, 1.0
    if x_T is None:
        x_T = sampler_registry.initial_noise(model, (batch_size, *shape), generator)
    if "clip_denoised" in spec.defaults:
        options.setdefault("clip_denoised", bool(getattr(model, "clip_denoised", False)))
    total = model.num_timesteps if spec.fixed_steps else steps
    with tqdm(total=total, desc=desc, leave=False, disable=not progress) as bar:
        return sampler_registry.sample(sampler, model, x_T, steps, cond=cond, uncond=uncond, scale=scale, eta=eta,
                                       generator=generator, callback=lambda i: bar.update(1), **options)


def initial_noise(model: Any, batch_size: int, shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """x_T drawn from `generator` (for --fixed_code: one start code reused by every iteration)."""
    return sampler_registry.initial_noise(model, (batch_size, *shape), generator)


def text_conditioning(model: Any, prompts: Sequence[str], scale: float) -> tuple[Any, Any]:
    """(c, uc) of a text model: uc is the empty prompt's conditioning, only when guiding."""
    c = model.get_learned_conditioning(list(prompts))
    uc = model.get_learned_conditioning(len(prompts) * [""]) if scale != 1.0 else None
    return c, uc


# ----------------------------------------------------------------------------------------
# Images in and out
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def decode(model: Any, z: Tensor) -> Tensor:
    """Latents -> images in [0, 1], float32 on the CPU."""
    x = model.decode_first_stage(z) if has_first_stage(model) else z
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [0, 1] -> (B, H, W, C) uint8 (255 x, truncated, as the original scripts)."""
    return (255.0 * images.permute(0, 2, 3, 1).numpy()).astype(np.uint8)


def load_image(path: PathLike, size: Optional[tuple[int, int]] = None) -> Tensor:
    """An RGB image as (1, 3, H, W) in [-1, 1]; `size` (W, H) resizes it (Lanczos)."""
    from PIL import Image
    p = require_file(path, "image")
    image = Image.open(p).convert("RGB")
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), resample=Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0


def load_mask(path: PathLike, image_path: PathLike, image_size_wh: tuple[int, int]) -> Tensor:
    """A mask as (1, 1, H, W) in {0, 1} (white >= 0.5 = 1 = hole); it must be the image's size."""
    from PIL import Image
    p = require_file(path, "mask")
    mask = Image.open(p).convert("L")
    if mask.size != tuple(image_size_wh):
        (mw, mh), (w, h) = mask.size, image_size_wh
        fail(f"mask '{p}' is {mw}x{mh} (WxH) but its image '{image_path}' is {w}x{h}: they must have the same size")
    m = np.asarray(mask, dtype=np.float32) / 255.0
    return torch.from_numpy((m >= 0.5).astype(np.float32))[None, None]


def read_prompts(prompt: Optional[str], from_file: Optional[PathLike], batch_size: int,
                 repeat: int = 1) -> list[list[str]]:
    """Batches of prompts: `batch_size` copies of `prompt`, or the lines of `from_file`
    (each `repeat` times) in chunks of `batch_size` (the last one may be smaller)."""
    if from_file is None:
        if prompt is None:
            fail("no prompt given (pass --prompt or --from-file)")
        return [batch_size * [prompt]]
    p = Path(from_file)
    if not p.is_file():
        fail(f"prompt file not found: '{p}'")
    lines = [line for line in p.read_text().splitlines() if line.strip()]
    if not lines:
        fail(f"prompt file '{p}' has no prompts (one per line)")
    lines = [line for line in lines for _ in range(repeat)]
    return [lines[i:i + batch_size] for i in range(0, len(lines), batch_size)]


class SampleWriter:
    """Numbered PNGs in `outdir/samples/` (continuing the count found there) and grids
    `outdir/grid-NNNN.png` (as the original scripts)."""

    def __init__(self, outdir: PathLike, subdir: str = "samples"):
        self.outdir = Path(outdir)
        self.sample_dir = self.outdir / subdir
        self.sample_dir.mkdir(parents=True, exist_ok=True)
        self.count = len(list(self.sample_dir.glob("*.png")))
        self.grid_count = len(list(self.outdir.glob("grid-*.png")))
        self.written: list[Path] = []
        self.batches: list[Tensor] = []

    def save(self, images: Tensor, names: Optional[Sequence[str]] = None) -> list[Path]:
        """Write (B, 3, H, W) images in [0, 1]; `names` replaces the numbers (without .png)."""
        from PIL import Image
        paths = []
        for i, arr in enumerate(to_uint8(images)):
            name = names[i] if names is not None else f"{self.count:05}"
            path = self.sample_dir / f"{name}.png"
            Image.fromarray(arr).save(path)
            paths.append(path)
            self.count += 1
        self.batches.append(images)
        self.written.extend(paths)
        return paths

    def save_grid(self, n_rows: int, batches: Optional[Sequence[Tensor]] = None) -> Optional[Path]:
        """One grid of every image saved so far (or of `batches`), `n_rows` images per row."""
        from PIL import Image
        from torchvision.utils import make_grid
        batches = list(self.batches if batches is None else batches)
        if not batches:
            return None
        if len({tuple(b.shape[1:]) for b in batches}) > 1:
            log.info("images of different sizes: no grid written")
            return None
        grid = make_grid(torch.cat(batches), nrow=max(1, n_rows))
        path = self.outdir / f"grid-{self.grid_count:04}.png"
        Image.fromarray(to_uint8(grid[None])[0]).save(path)
        self.grid_count += 1
        return path
