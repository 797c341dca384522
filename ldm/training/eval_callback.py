"""Evaluation during training: every N steps, sample a fixed set and log metrics and a grid.

In a config:

    lightning:
      callbacks:
        eval:
          target: ldm.training.eval_callback.EvalCallback
          params:
            every_n_steps: 1000
            n_samples: 64               # fixed seeds: the same x_T every call
            metrics: [fid, fd_dinov2]   # any of fid, kid, fd_dinov2, cmmd, clip_score
            ddim_steps: 20
            guidance_scale: 3.0
            n_reference: 256            # first images of the validation split (features computed once)
            random_weights: true        # offline only: random-weight feature networks (flagged)

Cost per call, stated in the log (`eval/seconds`, and at the first call as text):
n_samples x ddim_steps UNet evaluations (x2 with guidance) + decoding + one feature pass of the
samples per network; the reference features are extracted once per run. With few samples
FID-type numbers are biased upwards but comparable across steps (the same seeds and reference),
which is what watching a curve needs.

`distributed: rank0` (default) samples on rank 0 only; `sharded` splits the samples over ranks
and gathers the features on rank 0. Classes cycle through 0..n_classes-1 (class-conditional
models), prompts through `prompts` (text models).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)
NETWORK_OF = {"fid": "inception", "kid": "inception", "fd_dinov2": "dinov2", "cmmd": "clip", "clip_score": "clip"}


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class EvalCallback(pl.Callback):
    def __init__(self, every_n_steps: int = 1000, n_samples: int = 64, metrics: Sequence[str] = ("fid",),
                 ddim_steps: int = 20, eta: float = 0.0, guidance_scale: float = 1.0, seed: int = 0,
                 n_classes: Optional[int] = None, prompts: Optional[Sequence[str]] = None,
                 n_reference: int = 256, reference_split: str = "validation", batch_size: int = 32,
                 random_weights: bool = False, inception_weights: Optional[str] = None,
                 dinov2_weights: Optional[str] = None, clip_weights: Optional[str] = None,
                 dinov2_arch: Any = None, clip_arch: Any = None, use_ema: bool = True, log_grid: bool = True,
                 distributed: str = "rank0", at_train_end: bool = False):
        super().__init__()
        # every_n_steps: evaluate when global_step is a multiple of it (0: only at_train_end)
        # n_samples / seed: the fixed sample set (x_T drawn from a generator seeded with `seed`)
        # metrics: fid, kid (Inception), fd_dinov2 (DINOv2), cmmd, clip_score (CLIP; text models)
        # ddim_steps / eta / guidance_scale: the sampler (guidance: null class or empty prompt)
        # n_classes: labels cycle 0..n_classes-1 (default: the ClassEmbedder's, minus a null class)
        # prompts: captions cycled over the samples (text-conditional models; clip_score needs them)
        # n_reference / reference_split / batch_size: the reference images (the datamodule's split)
        # random_weights: random-weight feature networks for offline runs (logged as such)
        # *_weights / *_arch: local weight files / network variants (see ldm.eval.feature_nets)
        # use_ema: sample with the EMA weights when the model has them
        # distributed: "rank0" or "sharded"; at_train_end: also evaluate after the last step
        unknown = [m for m in metrics if m not in NETWORK_OF]
        if unknown:
            raise ValueError(f"EvalCallback: unknown metric(s) {unknown}; choose from {sorted(NETWORK_OF)}")
        if "clip_score" in metrics and not prompts:
            raise ValueError("EvalCallback: clip_score needs `prompts`")
        if distributed not in ("rank0", "sharded"):
            raise ValueError(f"EvalCallback: distributed must be rank0 or sharded, got {distributed!r}")
        self.every_n_steps, self.n_samples, self.metrics = every_n_steps, n_samples, list(metrics)
        self.ddim_steps, self.eta, self.guidance_scale, self.seed = ddim_steps, eta, guidance_scale, seed
        self.n_classes, self.prompts = n_classes, list(prompts) if prompts else None
        self.n_reference, self.reference_split, self.batch_size = n_reference, reference_split, batch_size
        self.weights = dict(inception=inception_weights, dinov2=dinov2_weights, clip=clip_weights)
        self.arch = dict(dinov2=dinov2_arch, clip=clip_arch)
        self.random_weights, self.use_ema, self.log_grid = random_weights, use_ema, log_grid
        self.distributed, self.at_train_end = distributed, at_train_end
        self.nets: dict[str, Any] = {}
        self.reference: dict[str, np.ndarray] = {}
        self.history: list[dict[str, float]] = []
        self._last_step = -1

    # ---- setup: networks are built (weights checked) before training starts ----
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Optional[str] = None) -> None:
        if stage not in (None, "fit") or self.nets or trainer.global_rank != 0:
            return
        from ldm.eval.feature_nets import ClipFeatures, DinoV2Features
        from ldm.eval.features import InceptionFeatures
        device = pl_module.device
        for net in dict.fromkeys(NETWORK_OF[m] for m in self.metrics):
            if net == "inception":
                self.nets[net] = InceptionFeatures(self.weights[net], self.random_weights, device)
            elif net == "dinov2":
                self.nets[net] = DinoV2Features(self.weights[net], self.random_weights, device, arch=self.arch[net])
            else:
                self.nets[net] = ClipFeatures(self.weights[net], self.random_weights, device, arch=self.arch[net])
        if self.random_weights:
            log.warning("EvalCallback: RANDOM-weight feature networks: the logged numbers only show trends")

    # ---- the fixed sample set ----
    def _conditioning(self, pl_module: Any, idx: torch.Tensor) -> tuple[Any, Any]:
        cond_model = getattr(pl_module, "cond_stage_model", None)
        if cond_model is None or getattr(pl_module.model, "conditioning_key", None) is None:
            return None, None
        if self.prompts:
            texts = [self.prompts[i % len(self.prompts)] for i in idx.tolist()]
            c = pl_module.get_learned_conditioning(texts)
            uc = pl_module.get_learned_conditioning([""] * len(texts)) if self.guidance_scale != 1.0 else None
            return c, uc
        n_emb = getattr(cond_model, "n_classes", None)
        if n_emb is None:
            raise ValueError(f"EvalCallback: {type(cond_model).__name__} conditioning needs `prompts`")
        n_classes = self.n_classes or (n_emb - 1 if getattr(cond_model, "ucg_rate", 0) > 0 else n_emb)
        key = getattr(cond_model, "key", "class")
        labels = (idx % n_classes).to(pl_module.device)
        c = pl_module.get_learned_conditioning({key: labels})
        uc = None
        if self.guidance_scale != 1.0:
            uc = pl_module.get_learned_conditioning(cond_model.get_unconditional_conditioning(len(idx), labels.device))
        return c, uc

    @torch.no_grad()
    def sample(self, pl_module: Any, indices: torch.Tensor) -> np.ndarray:
        """uint8 (n, H, W, 3) samples for the given sample indices (same x_T every call)."""
        from ldm.models.diffusion.ddim import DDIMSampler
        shape = (pl_module.channels, pl_module.image_size, pl_module.image_size)
        g = torch.Generator().manual_seed(self.seed)
        x_all = torch.randn((self.n_samples, *shape), generator=g)
        out = []
        sampler = DDIMSampler(pl_module)
        for chunk in indices.split(self.batch_size):
            c, uc = self._conditioning(pl_module, chunk)
            z, _ = sampler.sample(S=self.ddim_steps, batch_size=len(chunk), shape=shape, conditioning=c,
                                  eta=self.eta, x_T=x_all[chunk].to(pl_module.device), verbose=False,
                                  unconditional_guidance_scale=self.guidance_scale, unconditional_conditioning=uc)
            out.append(_to_uint8(pl_module.decode_first_stage(z).float()))
        return np.concatenate(out) if out else np.zeros((0, shape[1] * 8, shape[2] * 8, 3), np.uint8)

    def _reference_images(self, trainer: pl.Trainer) -> np.ndarray:
        dm = trainer.datamodule
        if dm is None or self.reference_split not in getattr(dm, "datasets", {}):
            raise ValueError(f"EvalCallback: the datamodule has no '{self.reference_split}' dataset for the reference")
        ds = dm.datasets[self.reference_split]
        n = min(self.n_reference, len(ds))
        imgs = [np.asarray(ds[i]["image"], np.float32) for i in range(n)]
        return ((np.clip(np.stack(imgs), -1, 1) + 1) * 127.5).round().astype(np.uint8)

    def _features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for name, net in self.nets.items():
            out[name] = np.concatenate([net(images[i:i + self.batch_size])[self._layer(name)]
                                        for i in range(0, len(images), self.batch_size)])
        return out

    @staticmethod
    def _layer(net: str) -> str:
        from ldm.eval.features import POOL
        return {"inception": POOL, "dinov2": "dinov2", "clip": "clip_image"}[net]

    # ---- one evaluation ----
    def evaluate(self, trainer: pl.Trainer, pl_module: Any) -> Optional[dict[str, float]]:
        from ldm.eval.fid import fid_from_features, kernel_inception_distance
        from ldm.eval.modern_metrics import clip_score, cmmd
        rank, world = trainer.global_rank, trainer.world_size
        t0 = time.perf_counter()
        if self.distributed == "sharded":
            indices = torch.arange(self.n_samples)[rank::world]
        else:
            indices = torch.arange(self.n_samples) if rank == 0 else torch.arange(0)
        was_training = pl_module.training
        pl_module.eval()
        ema = pl_module.ema_scope("EvalCallback") if self.use_ema and getattr(pl_module, "use_ema", False) else None
        try:
            if ema is not None:
                ema.__enter__()
            images = self.sample(pl_module, indices)
        finally:
            if ema is not None:
                ema.__exit__(None, None, None)
            pl_module.train(was_training)
        t_sample = time.perf_counter() - t0
        if self.distributed == "sharded" and world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, images)
            images = np.concatenate([g for g in gathered if g is not None and len(g)]) if rank == 0 else None
        if rank != 0:
            return None
        t_ref = 0.0
        if not self.reference:   # once per run: not part of the per-call cost
            t1 = time.perf_counter()
            self.reference = self._features(self._reference_images(trainer))
            t_ref = time.perf_counter() - t1
        feats = self._features(images)
        m: dict[str, float] = {}
        if "fid" in self.metrics:
            m["fid"] = fid_from_features(feats["inception"], self.reference["inception"])
        if "kid" in self.metrics:
            m["kid"] = kernel_inception_distance(feats["inception"], self.reference["inception"], 10,
                                                 min(len(images), len(self.reference["inception"])))["kid_mean"]
        if "fd_dinov2" in self.metrics:
            m["fd_dinov2"] = fid_from_features(feats["dinov2"], self.reference["dinov2"])
        if "cmmd" in self.metrics:
            m["cmmd"] = cmmd(feats["clip"], self.reference["clip"])
        if "clip_score" in self.metrics:
            texts = self.nets["clip"].text([self.prompts[i % len(self.prompts)] for i in range(len(images))])
            m["clip_score"] = clip_score(feats["clip"], texts)["clip_score"]
        m = {f"eval/{k}": float(v) for k, v in m.items()}
        m["eval/seconds"] = time.perf_counter() - t0 - t_ref
        m["eval/sampling_seconds"] = t_sample
        if t_ref:
            m["eval/reference_seconds"] = t_ref
        self._log(trainer, m, images)
        self.history.append({"step": trainer.global_step, **m})
        log.info("EvalCallback step %d: %s", trainer.global_step, ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
        return m

    def _log(self, trainer: pl.Trainer, m: dict[str, float], images: np.ndarray) -> None:
        step = trainer.global_step
        for lg in trainer.loggers:
            lg.log_metrics(m, step=step)
            exp = getattr(lg, "experiment", None)
            if self.log_grid and hasattr(exp, "add_image") and len(images):
                import torchvision
                grid = torchvision.utils.make_grid(torch.from_numpy(images[:64]).permute(0, 3, 1, 2),
                                                   nrow=int(np.ceil(np.sqrt(min(len(images), 64)))))
                exp.add_image("eval/samples", grid, step)
            if hasattr(exp, "add_text"):
                cost = (f"{self.n_samples} samples x {self.ddim_steps} DDIM steps"
                        f"{' x 2 (guidance)' if self.guidance_scale != 1.0 else ''}; networks {list(self.nets)}"
                        f"{' (RANDOM weights)' if self.random_weights else ''}; {m['eval/seconds']:.1f} s this call"
                        + (f" (+ {m['eval/reference_seconds']:.1f} s once for {self.n_reference} reference images)"
                           if "eval/reference_seconds" in m else ""))
                exp.add_text("eval/cost", cost, step)

    # ---- hooks ----
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.evaluate(trainer, pl_module)
