"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2 Sec. 3 and App. C): power-function EMAs stored as snapshots during training, and
the least-squares reconstruction of an EMA of any length from them afterwards.

A power-function EMA with exponent gamma averages the parameters theta_tau of steps tau <= t with
the profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1); step by step it is
    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1)
(t = 1, 2, ... counts optimizer steps, so theta_hat_1 = theta_1). The discrete weight it gives to
step tau is exactly the integral of p_t over (tau - 1, tau], so the closed-form inner products of
the continuous profiles below are those of the weights we actually apply. Its length is given as
sigma_rel, the standard deviation of p_t relative to t: sigma_rel^2 = (g+1) / ((g+2)^2 (g+3)).

`PostHocEMA` (a Lightning callback) keeps one such EMA per sigma_rel of the UNet's trainable
parameters and writes them every `every_n_steps` steps to
`<dirpath>/posthoc_ema/ema-<sigma_rel>-<step>.safetensors`; `scripts/posthoc_ema.py` turns those
snapshots into a checkpoint with any other sigma_rel. The original `LitEma` (use_ema) is untouched.

    lightning:
      callbacks:
        posthoc_ema:
          target: ldm.modules.posthoc_ema.PostHocEMA
          params: {sigma_rels: [0.05, 0.10], every_n_steps: 1000}
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "posthoc_ema"
SNAPSHOT_RE = re.compile(r"ema-(?P<sigma>[0-9.]+)-(?P<t>\d+)\.safetensors$")


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma of the power-function profile with relative std `sigma_rel` (EDM2 Eq. 3)."""
    if not 0.0 < sigma_rel < 12 ** -0.5:   # gamma -> -1 gives sigma_rel -> 1/sqrt(12)
        raise ValueError(f"sigma_rel must be in (0, {12 ** -0.5:.4f}), got {sigma_rel}")
    s2 = sigma_rel ** -2
    # (g+2)^2 (g+3) = s2 (g+1)  <=>  g^3 + 7 g^2 + (16 - s2) g + (12 - s2) = 0; the root above -1
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1))


def sigma_rel_from_gamma(gamma: float) -> float:
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """Integral over tau of p_a(tau) p_b(tau) for profiles ending at t_a and t_b (closed form)."""
    t = min(t_a, t_b)
    g = gamma_a + gamma_b + 1
    return (gamma_a + 1) * (gamma_b + 1) * t ** g / (g * t_a ** (gamma_a + 1) * t_b ** (gamma_b + 1))


def solve_weights(snapshots: Sequence[tuple[float, float]], t: float, gamma: float) -> np.ndarray:
    """Least-squares coefficients x (float64) with sum_i x_i p_i ~ p_(t, gamma) over the snapshots
    (t_i, gamma_i): the normal equations A x = b of EDM2 App. C.2, solved by lstsq (A may be
    near-singular when snapshots are dense)."""
    a = np.array([[profile_inner(ti, gi, tj, gj) for tj, gj in snapshots] for ti, gi in snapshots], np.float64)
    b = np.array([profile_inner(ti, gi, t, gamma) for ti, gi in snapshots], np.float64)
    return np.linalg.lstsq(a, b, rcond=None)[0]


class PowerFunctionEMA:
    """One power-function EMA of a set of named tensors (kept in `dtype`, on their device)."""

    def __init__(self, params: Mapping[str, torch.Tensor], gamma: float, dtype: torch.dtype = torch.float32):
        self.gamma = float(gamma)
        self.shadow = {k: v.detach().to(dtype).clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor], t: int) -> None:
        """Fold in the parameters after optimizer step t (1-based)."""
        beta = (1.0 - 1.0 / t) ** (self.gamma + 1.0)
        names = list(self.shadow)
        shadow = [self.shadow[k] for k in names]
        torch._foreach_lerp_(shadow, [params[k].detach().to(shadow[i].dtype) for i, k in enumerate(names)],
                             1.0 - beta)


def save_snapshot(path: Union[str, Path], tensors: Mapping[str, torch.Tensor], t: int, gamma: float,
                  sigma_rel: float) -> None:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"t": str(int(t)), "gamma": repr(float(gamma)), "sigma_rel": repr(float(sigma_rel))})
    tmp.replace(path)   # a killed run never leaves a half-written snapshot under the final name


def list_snapshots(directory: Union[str, Path]) -> list[tuple[Path, int, float]]:
    """(file, t, gamma) of every snapshot in `directory` (or its posthoc_ema/ subfolder), by t."""
    from safetensors import safe_open
    directory = Path(directory)
    if (directory / SNAPSHOT_DIR).is_dir():
        directory = directory / SNAPSHOT_DIR
    out = []
    for f in sorted(directory.glob("ema-*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
        if "t" not in meta or "gamma" not in meta:
            raise ValueError(f"{f}: not a post-hoc EMA snapshot (metadata 't' / 'gamma' missing)")
        out.append((f, int(meta["t"]), float(meta["gamma"])))
    if not out:
        raise FileNotFoundError(f"no post-hoc EMA snapshots (ema-*.safetensors) in {directory}; "
                                "train with the ldm.modules.posthoc_ema.PostHocEMA callback")
    return sorted(out, key=lambda s: (s[1], s[2]))


def reconstruct(snapshots: Sequence[tuple[Path, int, float]], sigma_rel: float, t: Optional[int] = None,
                dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Parameters of the power-function EMA with `sigma_rel` at step `t` (default: the last
    snapshot's), as sum_i x_i snapshot_i accumulated in float64; also returns x."""
    from safetensors.torch import load_file
    t = max(s[1] for s in snapshots) if t is None else t
    usable = [s for s in snapshots if s[1] <= t]
    if not usable:
        raise ValueError(f"no snapshot at or before step {t}")
    x = solve_weights([(float(ti), gi) for _, ti, gi in usable], float(t), gamma_from_sigma_rel(sigma_rel))
    out: dict[str, torch.Tensor] = {}
    for (f, _, _), xi in zip(usable, x):
        for k, v in load_file(str(f)).items():
            acc = out.setdefault(k, torch.zeros(v.shape, dtype=torch.float64))
            acc.add_(v.double(), alpha=float(xi))
    return {k: v.to(dtype) for k, v in out.items()}, x


class PostHocEMA(pl.Callback):
    """Power-function EMAs of `pl_module.<module>`'s trainable parameters, one per sigma_rel,
    written as safetensors snapshots every `every_n_steps` optimizer steps. Kept and written on
    rank 0 only (DDP: every rank holds the same parameters; sharded FSDP parameters are not
    supported). Keys are the LightningModule's state-dict keys (`model.diffusion_model....`)."""

    def __init__(self, sigma_rels: Iterable[float] = (0.05, 0.10), every_n_steps: int = 1000,
                 dirpath: Optional[str] = None, module: str = "model", dtype: str = "float32"):
        # sigma_rels: relative EMA lengths tracked (EDM2 uses 0.05 and 0.10)
        # every_n_steps: snapshot interval in optimizer steps (EDM2: ~ 1/100-1/200 of the run)
        # dirpath: where posthoc_ema/ goes (default: beside the checkpoints, <logdir>/checkpoints)
        # module: attribute of the LightningModule averaged (LatentDiffusion's UNet wrapper: "model")
        # dtype: storage of the running averages ("float32" or "float64")
        super().__init__()
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_from_sigma_rel(s) for s in self.sigma_rels]
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.dirpath, self.module = dirpath, module
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        self.emas: list[PowerFunctionEMA] = []
        self._loaded: Optional[dict[str, Any]] = None
        self._last_t = 0

    def _params(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        net = getattr(pl_module, self.module)
        return {f"{self.module}.{k}": p for k, p in net.named_parameters() if p.requires_grad}

    def snapshot_dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / SNAPSHOT_DIR
        ckpt = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(ckpt or Path(trainer.default_root_dir) / "checkpoints") / SNAPSHOT_DIR

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:   # DDP replicas hold the same parameters; rank 0 writes
            return
        params = self._params(pl_module)
        self.emas = [PowerFunctionEMA(params, g, self.dtype) for g in self.gammas]
        if self._loaded is not None:   # resumed: the running averages continue
            for ema, shadow in zip(self.emas, self._loaded["shadows"]):
                for k, v in shadow.items():
                    ema.shadow[k].copy_(v)
            self._loaded = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        t = int(trainer.global_step)   # optimizer steps done, this one included
        if t < 1 or not self.emas or t == self._last_t:   # accumulating gradients: no step yet
            return
        self._last_t = t
        params = self._params(pl_module)
        for ema in self.emas:
            ema.update(params, t)
        if t % self.every_n_steps == 0 and trainer.is_global_zero:
            self.write(trainer, t)

    def write(self, trainer: pl.Trainer, t: int) -> list[Path]:
        out = []
        for s, ema in zip(self.sigma_rels, self.emas):
            path = self.snapshot_dir(trainer) / f"ema-{s:.3f}-{t:08d}.safetensors"
            save_snapshot(path, ema.shadow, t, ema.gamma, s)
            out.append(path)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sigma_rels": self.sigma_rels, "shadows": [{k: v.cpu() for k, v in e.shadow.items()} for e in self.emas]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [float(s) for s in state_dict.get("sigma_rels", [])] != self.sigma_rels:
            raise ValueError(f"checkpoint's post-hoc EMA tracks sigma_rels {state_dict.get('sigma_rels')}, "
                             f"the config {self.sigma_rels}")
        self._loaded = state_dict

