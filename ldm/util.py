"""Small helpers every part of ldm uses: config instantiation and a few tensor utilities.

`instantiate_from_config` keeps the original semantics (a mapping with `target` and
optional `params`; the sentinels `__is_first_stage__` / `__is_unconditional__` yield
None) and adds two things the original lacked: targets that released configs name but
that live in the long-gone `taming` package resolve to our classes (one small table),
and a bad target or parameter raises a `ConfigError` naming the target, the key and,
when known, the YAML file it came from.
"""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import importlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional, TypeVar

import torch

T = TypeVar("T")

# Targets named by released configs whose code lived in `taming-transformers` (or moved).
# Each maps to the class of ours that implements the same semantics and state-dict keys.
LEGACY_TARGETS: dict[str, str] = {
    "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator":
        "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
    "taming.modules.losses.vqperceptual.DummyLoss": "ldm.modules.losses.vqperceptual.DummyLoss",
    "taming.modules.losses.lpips.LPIPS": "ldm.modules.losses.lpips.LPIPS",
    "taming.modules.discriminator.model.NLayerDiscriminator":
        "ldm.modules.losses.discriminator.NLayerDiscriminator",
    "taming.modules.vqvae.quantize.VectorQuantizer2": "ldm.modules.vqvae.quantize.VectorQuantizer2",
    "taming.modules.vqvae.quantize.VectorQuantizer": "ldm.modules.vqvae.quantize.VectorQuantizer2",
    "taming.data.faceshq.CelebAHQTrain": "ldm.data.faceshq.CelebAHQTrain",
    "taming.data.faceshq.CelebAHQValidation": "ldm.data.faceshq.CelebAHQValidation",
    "taming.data.faceshq.FFHQTrain": "ldm.data.faceshq.FFHQTrain",
    "taming.data.faceshq.FFHQValidation": "ldm.data.faceshq.FFHQValidation",
}

_SENTINELS = ("__is_first_stage__", "__is_unconditional__")

# The YAML file(s) the config being instantiated came from, for error messages.
_config_source: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ldm_config_source", default=None)


class ConfigError(ValueError):
    """A config names a target or a parameter that does not exist."""


@contextlib.contextmanager
def config_source(name: Optional[str]) -> Iterator[None]:
    """Within this block, config errors say they came from `name` (a YAML path)."""
    token = _config_source.set(name)
    try:
        yield
    finally:
        _config_source.reset(token)


def _where() -> str:
    src = _config_source.get()
    return f" (in {src})" if src else ""


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """'pkg.module.Name' -> the object; legacy `taming.*` paths resolve to ours."""
    string = LEGACY_TARGETS.get(string, string)
    if "." not in string:
        raise ConfigError(f"target '{string}' is not a dotted path 'module.Name'{_where()}")
    module_name, name = string.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
        if reload:
            module = importlib.reload(module)
    except ModuleNotFoundError as e:
        # Only a missing module *on the target path* is the config's fault; a missing
        # dependency inside an existing module must surface as itself.
        if e.name and module_name.startswith(e.name):
            raise ConfigError(f"unknown target '{string}': no module '{e.name}'{_where()}") from e
        raise
    try:
        return getattr(module, name)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        hint = difflib.get_close_matches(name, names, n=1)
        hint_s = f"; did you mean '{module_name}.{hint[0]}'?" if hint else ""
        raise ConfigError(f"unknown target '{string}': module '{module_name}' has no '{name}'{hint_s}{_where()}") from None


def check_params(target: str, obj: Callable, params: Mapping[str, Any]) -> None:
    """Raise a ConfigError naming the first key of `params` that `obj` does not accept."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [n for n, p in sig.parameters.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in params:
        if key not in accepted:
            hint = difflib.get_close_matches(str(key), accepted, n=1)
            hint_s = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{target} has no parameter '{key}'{hint_s}{_where()}")


def instantiate_from_config(config: Any, **extra: Any) -> Any:
    """Build `config.target(**config.params, **extra)`; the original's sentinels give None."""
    if isinstance(config, str) and config in _SENTINELS:
        return None
    if not isinstance(config, Mapping) or "target" not in config:
        if config in _SENTINELS:
            return None
        raise ConfigError(f"expected a mapping with key `target` to instantiate, got {config!r}{_where()}")
    target = str(config["target"])
    params = dict(config.get("params", None) or {})
    params.update(extra)
    obj = get_obj_from_str(target)
    check_params(target, obj, params)
    return obj(**params)


# ----------------------------------------------------------------------------------------
# Small helpers the original exposed from ldm.util (kept: configs and notebooks import them)
# ----------------------------------------------------------------------------------------
def exists(x: Any) -> bool:
    return x is not None


def default(val: Optional[T], d: T | Callable[[], T]) -> T:
    if exists(val):
        return val
    return d() if inspect.isfunction(d) else d


def ismap(x: Any) -> bool:
    """A (B, C, H, W) tensor with more than 3 channels: a segmentation / feature map."""
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] > 3


def isimage(x: Any) -> bool:
    """A (B, C, H, W) tensor with 1 or 3 channels."""
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {total * 1.e-6:.2f} M params.")
    return total


def log_txt_as_img(wh: tuple[int, int], xc: list[str], size: int = 10) -> torch.Tensor:
    """Render captions as images, (B, 3, H, W) in [-1, 1], for image logs."""
    from PIL import Image, ImageDraw, ImageFont
    import numpy as np

    txts = []
    for text in xc:
        txt = Image.new("RGB", wh, color="white")
        draw = ImageDraw.Draw(txt)
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has no size argument
            font = ImageFont.load_default()
        nc = max(1, int(40 * (wh[0] / 256)))
        lines = "\n".join(text[start:start + nc] for start in range(0, len(text), nc))
        draw.text((0, 0), lines, fill="black", font=font)
        arr = np.asarray(txt).transpose(2, 0, 1) / 127.5 - 1.0
        txts.append(arr)
    return torch.tensor(np.stack(txts), dtype=torch.float32)


# ----------------------------------------------------------------------------------------
# Helpers of the original public surface (retrieval scripts, SD v2 training)
# ----------------------------------------------------------------------------------------
def parallel_data_prefetch(func: Callable, data: Any, n_proc: int, target_data_type: str = "ndarray",
                           cpu_intensive: bool = True, use_worker_id: bool = False) -> Any:
    """`func` over `n_proc` contiguous chunks of `data` (a list, an array or a dict's values), in
    processes (cpu_intensive) or threads, results concatenated in chunk order: one array
    (target_data_type="ndarray") or one flat list ("list"). use_worker_id: func(chunk, worker_id)."""
    import concurrent.futures as cf

    import numpy as np
    if target_data_type not in ("ndarray", "list"):
        raise ValueError(f'target_data_type must be "ndarray" or "list", not {target_data_type!r}')
    if isinstance(data, np.ndarray) and target_data_type == "list":
        raise ValueError("a numpy array of data cannot be gathered as a list")
    if isinstance(data, Mapping):
        data = list(data.values())
    if target_data_type == "ndarray":
        data = np.asarray(data)
        chunks = np.array_split(data, n_proc)
    else:
        data = list(data)
        step = -(-len(data) // n_proc)
        chunks = [data[i:i + step] for i in range(0, len(data), step)] if data else [[]]
    pool_cls = cf.ProcessPoolExecutor if cpu_intensive else cf.ThreadPoolExecutor
    with pool_cls(max_workers=max(1, min(n_proc, len(chunks)))) as pool:
        futures = [pool.submit(func, c, i) if use_worker_id else pool.submit(func, c) for i, c in enumerate(chunks)]
        results = [f.result() for f in futures]   # a worker's exception surfaces here, naming the cause
    if target_data_type == "ndarray":
        return np.concatenate([np.asarray(r) for r in results], axis=0)
    return [x for r in results for x in r]


def autocast(f: Callable) -> Callable:
    """Decorator (SD v2): run `f` under CUDA autocast with the current autocast dtype; a no-op
    without CUDA."""
    import functools

    @functools.wraps(f)
    def do_autocast(*args: Any, **kwargs: Any) -> Any:
        if not torch.cuda.is_available():
            return f(*args, **kwargs)
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                            cache_enabled=torch.is_autocast_cache_enabled()):
            return f(*args, **kwargs)
    return do_autocast


class AdamWwithEMAandWings(torch.optim.AdamW):
    """AdamW that also keeps an EMA of each parameter in its state (`param_exp_avg`), with decay
    min(ema_decay, 1 - step ** -ema_power) (SD v2's optimizer; `param_names` for logging only)."""

    def __init__(self, params: Any, lr: float = 1.0e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1.0e-8, weight_decay: float = 1.0e-2, amsgrad: bool = False,
                 ema_decay: float = 0.9999, ema_power: float = 1.0, param_names: tuple = ()):
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"Invalid ema_decay value: {ema_decay}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        for group in self.param_groups:
            group.setdefault("ema_decay", ema_decay)
            group.setdefault("ema_power", ema_power)
            group.setdefault("param_names", param_names)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                step = float(state["step"])
                decay = min(group["ema_decay"], 1.0 - step ** -group["ema_power"])
                if "param_exp_avg" not in state:
                    state["param_exp_avg"] = p.detach().float().clone()
                state["param_exp_avg"].mul_(decay).add_(p.float(), alpha=1.0 - decay)
        return loss
