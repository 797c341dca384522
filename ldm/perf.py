"""Small, switchable performance helpers, and the measurements `scripts/benchmark.py` reports.

Every switch defaults to the plain float32 eager behaviour; each has a parity test
(`tests/test_perf_*.py`) against that path.

Switches (config keys in brackets):
- mixed precision: `autocast(precision, device)`, the context Lightning's `precision=`
  ("bf16-mixed", "16-mixed") opens around each step; the first stage always decodes in
  float32 (`LatentDiffusion.decode_first_stage`), attention softmax accumulates in float32 (SDPA).
- channels_last memory format of the UNet [`unet_config.params.use_channels_last`].
- torch.compile of the UNet, in place so state-dict keys do not change [`compile_unet`]; or
  of its repeated blocks only (regional compilation, a fraction of the cold-compile time)
  [`compile_unet: {regional: true}`].
- fused AdamW on CUDA [`use_fused_adam`].
- latents cached to disk by `scripts/cache_latents.py`: a batch carrying `latent`
  (+ `latent_logvar`) skips the first-stage encoder (`cached_first_stage_encoding`).
- activation checkpointing is the UNet's own `use_checkpoint`.

Measurements: `Timer`-free helpers for FLOPs (`count_flops`), peak memory (`PeakMemory`) and
the device's peak throughput (`device_peak_tflops`) for MFU.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

# ----------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------
_PRECISIONS: dict[str, Optional[torch.dtype]] = {
    "32": None, "fp32": None, "32-true": None, "float32": None,
    "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "bfloat16": torch.bfloat16,
    "16": torch.float16, "fp16": torch.float16, "16-mixed": torch.float16, "float16": torch.float16,
}


def autocast_dtype(precision: Union[str, int]) -> Optional[torch.dtype]:
    """Lightning-style precision ("32", "bf16-mixed", "16-mixed", "bf16", "fp16", ...) -> the
    autocast dtype, or None for full float32."""
    key = str(precision).lower()
    if key not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {sorted(_PRECISIONS)}")
    return _PRECISIONS[key]


def autocast(precision: Union[str, int], device: Union[str, torch.device]) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` on `device` (a no-op for float32), as Lightning's
    MixedPrecision plugin opens it around training / validation / predict steps."""
    dtype = autocast_dtype(precision)
    device_type = torch.device(device).type
    if dtype is None:
        return contextlib.nullcontext()
    if device_type == "cpu" and dtype == torch.float16:
        warnings.warn(f"precision {precision!r}: fp16 is not supported on CPU: running in fp32 (use bf16 for "
                      "reduced precision on CPU)", UserWarning, stacklevel=2)
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def param_dtype(module: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """dtype of the first floating-point parameter of `module`."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


@contextlib.contextmanager
def full_precision(device: Union[str, torch.device]) -> Iterator[None]:
    """Turn autocast off inside the block (first-stage decode under a mixed-precision step)."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda", "xpu", "mps"):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield


# ----------------------------------------------------------------------------------------
# Memory format, compilation, optimizer
# ----------------------------------------------------------------------------------------
def compile_module(module: nn.Module, options: Union[bool, Mapping[str, Any], None] = True) -> nn.Module:
    """`torch.compile` `module` in place (`nn.Module.compile`): the same object, same attribute
    tree and state-dict keys; the first call compiles. `options`: True or a dict of
    torch.compile keywords (mode, fullgraph, dynamic, backend), plus `regional: true` to
    compile only the repeated blocks (`compile_repeated_blocks`) instead of the whole module."""
    if not options:
        return module
    kwargs = dict(options) if isinstance(options, Mapping) else {}
    if kwargs.pop("regional", False):
        compile_repeated_blocks(module, kwargs)
        return module
    module.compile(**kwargs)
    return module


# The UNet's repeated blocks (ldm.modules.diffusionmodules.openaimodel / ldm.modules.attention)
REPEATED_BLOCKS = ("ResBlock", "SpatialTransformer", "AttentionBlock")


def compile_repeated_blocks(module: nn.Module, options: Optional[Mapping[str, Any]] = None,
                            block_types: Iterable[str] = REPEATED_BLOCKS) -> list[str]:
    """Regional compilation: `torch.compile` every block of `module` whose class is named in
    `block_types` (outermost ones only), in place; returns their names.

    Blocks of the same class and shapes share one compiled graph (dynamo inlines nn.Module
    calls, so parameters are graph inputs, not constants), so a cold compile costs a few
    block-sized graphs instead of one whole-UNet graph; the glue between blocks (timestep
    embedding, skip concatenations) stays eager. Dynamo's per-function recompile limit is
    raised to the number of blocks, since blocks at different widths need their own graphs."""
    kwargs = dict(options or {})
    types = set(block_types)
    names: list[str] = []
    for name, m in module.named_modules():
        if type(m).__name__ in types and not any(name.startswith(n + ".") for n in names):
            m.compile(**kwargs)
            names.append(name)
    import torch._dynamo.config as dynamo_config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), len(names) + 8))
            break
    return names


def is_compiled(module: nn.Module) -> bool:
    """Whether `compile_module` (nn.Module.compile) was applied to `module`."""
    return getattr(module, "_compiled_call_impl", None) is not None


def adamw(params: Iterable[nn.Parameter], lr: float, fused: bool = False, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW; with `fused`, the fused kernel when every parameter is on CUDA (else the default
    foreach / for-loop implementation, which computes the same update)."""
    params = list(params)
    if fused and params and all(p.is_cuda for p in params):
        kwargs["fused"] = True
    return torch.optim.AdamW(params, lr=lr, **kwargs)


# ----------------------------------------------------------------------------------------
# Cached latents (scripts/cache_latents.py -> ldm.data.cached_latents -> LatentDiffusion.get_input)
# ----------------------------------------------------------------------------------------
LATENT_KEY = "latent"                # (B, C, h, w) first-stage encoding before scale_factor: the
                                     # posterior mean (KL), pre-quantisation h (VQ), or a sample
LATENT_LOGVAR_KEY = "latent_logvar"  # (B, C, h, w) posterior log-variance (KL): sampled per step
CACHED_COND_KEY = "cached_cond"      # (B, ...) a frozen cond stage's output (cache_latents.py --text): used as c
CACHED_UNCOND_KEY = "cached_uncond"  # (B, ...) the same stage's output for the empty prompt


def has_cached_latent(batch: Any) -> bool:
    return isinstance(batch, Mapping) and LATENT_KEY in batch


def cached_first_stage_encoding(batch: Mapping[str, Any], device: Union[str, torch.device],
                                bs: Optional[int] = None) -> Union[torch.Tensor, DiagonalGaussianDistribution]:
    """What `first_stage_model.encode` would have returned for this batch: the posterior
    (mean + logvar cached: `.sample()` then draws `torch.randn` exactly as on the fly) or the
    cached tensor itself. Float32, on `device`, first `bs` items."""
    mean = torch.as_tensor(batch[LATENT_KEY])[:bs].to(device=device, dtype=torch.float32)
    if LATENT_LOGVAR_KEY not in batch:
        return mean
    logvar = torch.as_tensor(batch[LATENT_LOGVAR_KEY])[:bs].to(device=device, dtype=torch.float32)
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))


# ----------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (forward and, if `fn` calls it, backward), counted by
    torch.utils.flop_counter (matmuls, convolutions, attention; elementwise ops are free)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


# Dense peak TFLOP/s per device (vendor data sheets, SXM parts, without sparsity).
_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0}),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    ("V100", {"fp32": 15.7, "tf32": 15.7, "bf16": 15.7, "fp16": 125.0}),
    ("4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}),
]


def device_peak_tflops(device: Union[str, torch.device], precision: Union[str, int]) -> Optional[float]:
    """Peak dense TFLOP/s of a CUDA device for `precision` (float32 counts as TF32 when
    torch.backends.cuda.matmul.allow_tf32 is on), or None when unknown (CPU, other GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    dtype = autocast_dtype(precision)
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype) if dtype is not None else (
        "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    for pattern, table in _PEAK_TFLOPS:
        if pattern in name:
            return table[key]
    return None


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory of the code inside `with PeakMemory(device) as m:` -> `m.peak_bytes`.

    CUDA: `torch.cuda.max_memory_allocated` after a reset (tensors only, allocator cache
    excluded). CPU: the peak increase of the process's resident set size over its value at
    entry, sampled every `interval` s from /proc/self/statm by a background thread (Linux;
    None elsewhere). The CPU figure is an estimate: memory the allocator kept from earlier
    work is reused without raising RSS, so it under-counts after a warm-up that already
    touched as much memory, and it includes non-tensor allocations.
    """

    def __init__(self, device: Union[str, torch.device], interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._max = self._base
            if self._base is not None:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None and rss > self._max:
                self._max = rss

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes()
            self._max = max(self._max, rss or 0)
            self.peak_bytes = self._max - self._base


def cached_conditioning(batch: Mapping[str, Any], cond_key: str, device: Union[str, torch.device],
                        dropping: bool = False) -> torch.Tensor:
    """c from a batch cached with `cache_latents.py --text`. Items whose caption is "" (ucg_rate's
    text dropout has just emptied them, or they were empty) take the cached empty-prompt encoding,
    exactly what the text encoder would have returned for them."""
    c = batch[CACHED_COND_KEY].float()
    texts = batch.get(cond_key)
    if CACHED_UNCOND_KEY in batch and isinstance(texts, (list, tuple)):
        empty = torch.tensor([t == "" for t in texts], dtype=torch.bool).view(-1, *[1] * (c.dim() - 1))
        c = torch.where(empty, batch[CACHED_UNCOND_KEY].float(), c)
    elif dropping:
        raise ValueError(f"ucg_rate on cached conditioning ('{CACHED_COND_KEY}') needs the captions ('{cond_key}') and "
                         f"the empty prompt's encoding ('{CACHED_UNCOND_KEY}', written by cache_latents.py --text "
                         "to uncond.safetensors); re-cache, or set ucg_rate: null")
    return c.to(device)
