"""End-to-end evaluation: sample (resumably) -> Inception features -> metrics -> table row + JSON.

`run_generative` evaluates a diffusion model against reference statistics of a dataset split;
`run_autoencoder` evaluates reconstructions (rFID, R-IS, PSNR, SSIM, PSIM). Both take an
`EvalSettings` (what the CLI and presets fill in) and optionally an already-built sampling
function / model, which is how the tests run them without trained weights.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ldm.eval.features import LOGITS, POOL, RANDOM_WEIGHTS_NOTE, InceptionFeatures
from ldm.eval.fid import feature_statistics, fid_features_vs_stats, inception_score, kernel_inception_distance
from ldm.eval.image_metrics import LPIPS_RANDOM_NOTE, build_lpips, lpips_distance, mean_std, psnr, ssim, to_uint8
from ldm.eval.prdc import precision_recall
from ldm.eval.reference_stats import (ReferenceStats, build_dataset, dataset_config, folder_batches,
                                      reference_statistics)
from ldm.eval.report import format_report, write_json
from ldm.eval.sample_for_eval import (SampleFn, SamplerSettings, SamplingPlan, distributed_env, generate,
                                      latent_shape, load_ldm, make_ldm_sample_fn, model_class_info, read_samples)

logger = logging.getLogger(__name__)
GENERATIVE_METRICS = ("fid", "is", "kid", "pr", "sfid", "fd_dinov2", "cmmd", "clip_score")
DEFAULT_GENERATIVE_METRICS = ("fid", "is", "kid", "pr")
INCEPTION_METRICS = ("fid", "is", "kid", "pr")
# metric -> the feature network (key of `build_feature_nets`) its number is computed on
METRIC_NETWORK = {"fid": "inception", "is": "inception", "kid": "inception", "pr": "inception",
                  "rfid": "inception", "ris": "inception", "sfid": "inception_spatial", "fd_dinov2": "dinov2", "cmmd": "clip", "clip_score": "clip"}
AUTOENCODER_METRICS = ("rfid", "ris", "psnr", "ssim", "psim")


@dataclass
class EvalSettings:
    task: str = "generative"              # generative | autoencoder
    config: Optional[str] = None          # model YAML (its `data` section gives the reference dataset)
    ckpt: Optional[str] = None            # model checkpoint
    outdir: str = "eval_out"              # samples {i:06d}.png and eval_results.json
    json_path: Optional[str] = None       # results file (default outdir/eval_results.json)
    n: Optional[int] = 50000              # samples to generate (autoencoder: images to use, None = all)
    sampler: str = "ddim"
    steps: int = 200
    eta: float = 1.0
    scale: float = 1.0                    # classifier-free guidance scale
    batch: int = 50
    seed: int = 0
    n_classes: Optional[int] = None       # class-conditional: labels i % n_classes (default from the model)
    uncond_label: Optional[int] = None    # guidance's null class (default: last embedding when there are 1001)
    split: Optional[str] = None           # reference split (generative: train, autoencoder: validation)
    reference_data: Optional[dict] = None  # {target, params} replacing the config's dataset for that split
    ref_folder: Optional[str] = None      # reference images from a folder instead of a dataset
    ref_limit: Optional[int] = None       # use only the first N reference images (quick runs)
    max_ref_features: int = 50000         # reference features kept for PR / KID
    metrics: Sequence[str] = DEFAULT_GENERATIVE_METRICS
    inception_weights: Optional[str] = None
    random_inception: bool = False        # offline smoke test: random-weight Inception (flagged)
    dinov2_weights: Optional[str] = None  # dinov2_vitl14_pretrain.pth (FD-DINOv2)
    clip_weights: Optional[str] = None    # open_clip ViT-L-14-336 checkpoint (CMMD, CLIP score)
    random_features: bool = False         # offline smoke test: random-weight DINOv2 / CLIP (flagged)
    dinov2_arch: Any = None               # timm DINOv2 variant (tests: a tiny one); default ViT-L/14
    clip_arch: Any = None                 # open_clip model name or CLIP kwargs; default ViT-L-14-336
    clip_prompts: Optional[str] = None    # text file: line i is the caption of sample i (CLIP score)
    random_lpips: bool = False            # offline smoke test: random-weight LPIPS (flagged)
    device: Optional[str] = None          # default: cuda:LOCAL_RANK if available, else cpu
    cache_dir: Optional[str] = None
    use_cache: bool = True
    num_workers: int = 0
    skip_sampling: bool = False           # only evaluate the PNGs already in outdir
    force: bool = False                   # resume into a folder written with another protocol
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    progress: bool = True
    preset: Optional[str] = None
    row: Optional[str] = None
    paper: dict = field(default_factory=dict)
    uncertain: dict = field(default_factory=dict)


def _check_metrics(metrics: Sequence[str], known: Sequence[str]) -> None:
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(known)}")


def pick_device(requested: Optional[str], local_rank: int = 0) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def _model_config(path: Optional[str]) -> Any:
    if not path:
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(path)


def reference_for(s: EvalSettings, extractor: InceptionFeatures, cfg: Any, split: str) -> ReferenceStats:
    common = dict(limit=s.ref_limit, max_features=s.max_ref_features, batch_size=s.batch, cache_dir=s.cache_dir,
                  use_cache=s.use_cache, progress=s.progress)
    if s.ref_folder:
        return reference_statistics(extractor, folder=s.ref_folder, **common)
    data = s.reference_data or (cfg.get("data") if cfg is not None else None)
    if data is None:
        raise ValueError("no reference: give a config with a `data` section, reference_data, or a reference folder")
    key = "image"
    if cfg is not None and "model" in cfg:
        key = cfg.model.get("params", {}).get("first_stage_key", "image")
    return reference_statistics(extractor, data_config=data, split=split, image_key=key,
                                num_workers=s.num_workers, **common)


def build_feature_nets(s: EvalSettings, metrics: Sequence[str], device: torch.device) -> dict[str, Any]:
    """The feature networks `metrics` need, built now: missing weights fail before any sampling."""
    from ldm.eval.feature_nets import ClipFeatures, DinoV2Features
    nets: dict[str, Any] = {}
    wanted = {METRIC_NETWORK[m] for m in metrics}
    if "inception" in wanted:
        nets["inception"] = InceptionFeatures(s.inception_weights, s.random_inception, device)
    if "inception_spatial" in wanted:
        from ldm.eval.features import InceptionSpatialFeatures
        nets["inception_spatial"] = InceptionSpatialFeatures(s.inception_weights, s.random_inception, device)
    if "dinov2" in wanted:
        nets["dinov2"] = DinoV2Features(s.dinov2_weights, s.random_features, device, arch=s.dinov2_arch)
    if "clip" in wanted:
        nets["clip"] = ClipFeatures(s.clip_weights, s.random_features, device, arch=s.clip_arch)
    return nets


def read_prompts_file(path: Optional[str], n: int) -> list[str]:
    """Captions for CLIP score: line i of `path` is the caption of sample i (cycled to n)."""
    if not path:
        raise ValueError("clip_score needs --clip-prompts FILE (line i = the caption of sample i)")
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"no captions in '{path}'")
    return [lines[i % len(lines)] for i in range(n)]


def generative_metrics(gen: dict[str, dict[str, np.ndarray]], ref: dict[str, ReferenceStats],
                       metrics: Sequence[str], s: EvalSettings, device: torch.device,
                       nets: Optional[dict[str, Any]] = None, prompts: Optional[list[str]] = None) -> dict[str, Any]:
    """Metrics from sample features `gen[net][layer]` and reference statistics `ref[net]`."""
    from ldm.eval.modern_metrics import clip_score, cmmd
    first = next(iter(gen.values()))
    first_ref = next(iter(ref.values())) if ref else None
    out: dict[str, Any] = {"n_samples": len(next(iter(first.values())))}
    if first_ref is not None:
        out.update(n_reference=first_ref.n, n_reference_features=len(first_ref.features))
    if "fid" in metrics:
        out["fid"] = fid_features_vs_stats(gen["inception"][POOL], ref["inception"].mu, ref["inception"].sigma)
    if "is" in metrics:
        out.update(inception_score(gen["inception"][LOGITS]))
    if "kid" in metrics:
        out.update(kernel_inception_distance(gen["inception"][POOL], ref["inception"].features, s.kid_subsets,
                                             s.kid_subset_size))
    if "pr" in metrics:
        out.update(precision_recall(ref["inception"].features, gen["inception"][POOL], k=s.pr_k, device=device))
    if "sfid" in metrics:
        from ldm.eval.features import SPATIAL
        sp = ref["inception_spatial"]
        out["sfid"] = fid_features_vs_stats(gen["inception_spatial"][SPATIAL], sp.mu, sp.sigma)
    if "fd_dinov2" in metrics:
        d = ref["dinov2"]
        out["fd_dinov2"] = fid_features_vs_stats(gen["dinov2"]["dinov2"], d.mu, d.sigma)
    if "cmmd" in metrics:
        out["cmmd"] = cmmd(gen["clip"]["clip_image"], ref["clip"].features, device=device)
    if "clip_score" in metrics:
        texts = nets["clip"].text(prompts)
        out.update(clip_score(gen["clip"]["clip_image"], texts))
    return out


def _init_distributed(world: int, device: torch.device) -> bool:
    if world <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def resolve_classes(model: Any, s: EvalSettings) -> tuple[Optional[int], Optional[int]]:
    """(n_classes for labels, uncond label) from the settings, else the model's ClassEmbedder."""
    n_emb = model_class_info(model)
    if n_emb is None:
        return s.n_classes, s.uncond_label
    n_classes = s.n_classes or (n_emb - 1 if n_emb == 1001 else n_emb)
    uncond = s.uncond_label if s.uncond_label is not None else (n_emb - 1 if n_emb == 1001 else None)
    return n_classes, uncond


def sample_to_outdir(s: EvalSettings, device: torch.device, rank: int = 0, world: int = 1,
                     sample_fn: Optional[SampleFn] = None, shape: Optional[Sequence[int]] = None,
                     protocol: Optional[dict] = None) -> dict[str, Any]:
    """Generate this rank's share of `s.n` samples into `s.outdir` (resuming); returns the plan."""
    n_classes = s.n_classes
    if sample_fn is None:  # the model lives only inside this function: freed before evaluation
        model = load_ldm(s.config, s.ckpt, device)
        n_classes, uncond = resolve_classes(model, s)
        settings = SamplerSettings(s.sampler, s.steps, s.eta, s.scale, uncond)
        sample_fn, shape = make_ldm_sample_fn(model, settings), latent_shape(model)
        protocol = {"config": s.config, "ckpt": s.ckpt, **settings.as_dict()}
    plan = SamplingPlan(n=s.n, outdir=s.outdir, shape=tuple(shape), batch_size=s.batch, seed=s.seed,
                        n_classes=n_classes, rank=rank, world_size=world, protocol=protocol or {})
    counts = generate(sample_fn, plan, device, progress=s.progress, force=s.force)
    return {**asdict(plan), "counts_rank0": counts}


def run_generative(s: EvalSettings, sample_fn: Optional[SampleFn] = None, shape: Optional[Sequence[int]] = None,
                   protocol: Optional[dict] = None) -> Optional[dict]:
    """Sample `s.n` images into `s.outdir` (resuming; all ranks under torchrun), then evaluate
    them on rank 0. `sample_fn`/`shape`/`protocol` replace the model (tests, custom samplers)."""
    _check_metrics(s.metrics, GENERATIVE_METRICS)
    rank, world, local = distributed_env()
    device = pick_device(s.device, local)
    # every feature network and input the metrics need is checked before the first sample
    nets = build_feature_nets(s, s.metrics, device) if rank == 0 else {}
    prompts = read_prompts_file(s.clip_prompts, s.n) if "clip_score" in s.metrics and rank == 0 else None
    dist = _init_distributed(world, device)
    sampling: dict[str, Any] = {}
    if not s.skip_sampling:
        sampling = sample_to_outdir(s, device, rank, world, sample_fn, shape, protocol)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if dist:
        torch.distributed.barrier()
    if rank != 0:
        return None
    paths = read_samples(s.outdir, s.n)
    if prompts is not None:
        prompts = prompts[:len(paths)]
    cfg = _model_config(s.config)
    gen, ref = {}, {}
    for name, net in nets.items():
        gen[name] = net.extract(folder_batches(paths, s.batch), progress=s.progress, desc=f"sample features ({name})")
        if name != "clip" or "cmmd" in s.metrics:
            ref[name] = reference_for(s, net, cfg, s.split or "train")
    metrics = generative_metrics(gen, ref, s.metrics, s, device, nets, prompts)
    result = _result(s, "generative", metrics, nets, ref.get("inception") or next(iter(ref.values()), None),
                     sampling=sampling)
    _finish(s, result)
    return result


# ------------------------------------------------------------------------------------------
# Autoencoders
# ------------------------------------------------------------------------------------------
def reconstruct(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction: KL posterior mode, VQ quantised codes (VQModelInterface
    quantises inside decode)."""
    enc = model.encode(x)
    if not torch.is_tensor(enc) and hasattr(enc, "mode"):   # DiagonalGaussianDistribution
        z = enc.mode()
    elif isinstance(enc, tuple):
        z = enc[0]
    else:
        z = enc
    return model.decode(z)


def load_autoencoder(config_path: str, ckpt: str, device: torch.device) -> Any:
    """Build a first-stage model without its training loss (lossconfig -> Identity) and load it."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config

    config = OmegaConf.load(config_path)
    config.model.params.lossconfig = {"target": "torch.nn.Identity"}
    return load_model_from_config(config, ckpt).to(device).eval()


class _FloatCollate:
    def __init__(self, key: str):
        self.key = key

    def __call__(self, items: list) -> torch.Tensor:
        x = np.stack([np.asarray(it[self.key], dtype=np.float32) for it in items])  # (B, H, W, C) in [-1, 1]
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _float_batches(dataset: Any, key: str, batch: int, n: Optional[int], workers: int) -> Iterator[torch.Tensor]:
    import torch.utils.data as tud

    if n is not None and n < len(dataset):
        dataset = tud.Subset(dataset, list(range(n)))
    yield from tud.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers,
                              collate_fn=_FloatCollate(key))


@torch.no_grad()
def run_autoencoder(s: EvalSettings, model: Any = None) -> dict:
    """rFID / R-IS / PSNR / SSIM / PSIM of reconstructions of a dataset split (default validation)."""
    _check_metrics(s.metrics, AUTOENCODER_METRICS)
    device = pick_device(s.device)
    cfg = _model_config(s.config)
    metrics_wanted = set(s.metrics)
    # feature / LPIPS weights are checked before the model is loaded and anything reconstructed
    need_inception = bool(metrics_wanted & {"rfid", "ris"})
    extractor = InceptionFeatures(s.inception_weights, s.random_inception, device) if need_inception else None
    lpips_net = build_lpips(s.random_lpips, device) if "psim" in metrics_wanted else None
    if model is None:
        model = load_autoencoder(s.config, s.ckpt, device)
    split = s.split or "validation"
    data = s.reference_data or (cfg.get("data") if cfg is not None else None)
    if s.ref_folder:
        data = {"target": "ldm.data.base.ImageFolderDataset", "params": {"root": s.ref_folder}}
    if data is None:
        raise ValueError("no dataset: give a config with a `data` section, reference_data or a folder")
    dataset = build_dataset(dataset_config(data, split))
    key = "image"
    if cfg is not None and "model" in cfg:
        key = cfg.model.get("params", {}).get("image_key", "image")
    per_image: dict[str, list] = {"psnr": [], "ssim": [], "psim": []}
    feats: dict[str, list] = {"orig": [], "rec": [], "rec_logits": []}
    from tqdm import tqdm

    total = len(dataset) if s.n is None else min(s.n, len(dataset))
    with tqdm(total=total, desc="reconstructions", unit="img", disable=not s.progress) as bar:
        for x in _float_batches(dataset, key, s.batch, s.n, s.num_workers):
            rec = reconstruct(model, x.to(device)).float().cpu()
            a, b = to_uint8(x), to_uint8(rec)            # (B, 3, H, W) uint8
            per_image["psnr"].append(psnr(a, b))
            per_image["ssim"].append(ssim(a, b))
            if lpips_net is not None:
                per_image["psim"].append(lpips_distance(lpips_net, a, b))
            if extractor is not None:
                fa, fb = extractor(a), extractor(b)
                feats["orig"].append(fa[POOL])
                feats["rec"].append(fb[POOL])
                feats["rec_logits"].append(fb[LOGITS])
            bar.update(len(x))
    metrics: dict[str, Any] = {"n_images": total}
    for k in ("psnr", "ssim", "psim"):
        if k in metrics_wanted and per_image[k]:
            metrics[k] = mean_std(np.concatenate(per_image[k]))
    if "rfid" in metrics_wanted:
        orig, rec = np.concatenate(feats["orig"]), np.concatenate(feats["rec"])
        metrics["rfid"] = fid_features_vs_stats(rec, *feature_statistics(orig))
    if "ris" in metrics_wanted:
        r = inception_score(np.concatenate(feats["rec_logits"]))
        metrics.update(ris_mean=r["is_mean"], ris_std=r["is_std"], ris_splits=r["is_splits"])
    result = _result(s, "autoencoder", metrics, extractor, None, dataset={"split": split, "config": _plain(data)})
    if s.random_lpips and lpips_net is not None:
        result["warnings"].append(LPIPS_RANDOM_NOTE)
    _finish(s, result)
    return result


def _result(s: EvalSettings, task: str, metrics: dict, nets: Any, ref: Optional[ReferenceStats],
            **extra: Any) -> dict:
    """The JSON record: metrics, warnings, and for each metric the feature network + weights hash."""
    if nets is not None and not isinstance(nets, dict):
        nets = {"inception": nets}
    nets = nets or {}
    warnings = []
    if s.random_inception and ("inception" in nets or "inception_spatial" in nets):
        warnings.append(RANDOM_WEIGHTS_NOTE)
    warnings += [net.provenance["note"] for name, net in nets.items()
                 if not name.startswith("inception") and "note" in net.provenance]
    protocol = {k: v for k, v in asdict(s).items() if k not in ("paper", "uncertain", "row", "progress")}
    protocol["features"] = nets["inception"].provenance if "inception" in nets else None
    protocol["feature_networks"] = {m: nets[METRIC_NETWORK[m]].provenance for m in s.metrics
                                    if METRIC_NETWORK.get(m) in nets}
    if ref is not None:
        protocol["reference"] = {"n_images": ref.n, "n_features_kept": len(ref.features),
                                 "cache_file": ref.path, "key": ref.key}
    return {"task": task, "preset": s.preset, "row": s.row, "metrics": metrics, "paper": s.paper or None,
            "uncertain": s.uncertain or None, "warnings": warnings, "protocol": protocol, **extra}


def _finish(s: EvalSettings, result: dict) -> None:
    path = write_json(s.json_path or Path(s.outdir) / "eval_results.json", result)
    result["json_path"] = str(path)
    print(format_report(result))
    print(f"results written to {path}")



def _plain(x: Any) -> Any:
    """OmegaConf containers -> plain dicts / lists (for the JSON record)."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x
