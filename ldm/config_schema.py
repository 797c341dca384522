"""Configs checked all the way down, before anything is built.

`check_config(config)` walks a `{target, params}` tree and raises one `ConfigError` naming the
key path (and the YAML file of the enclosing `config_source`) for
- a key no constructor on the way accepts: `params` of every target (classes that forward
  `**kwargs` to their base classes accept the bases' keywords), and the plain dicts a class
  unpacks into other constructors (`ddconfig` -> Encoder and Decoder, see `KWARGS_DICTS`),
  with a did-you-mean;
- a value of the wrong type (`embed_dim: "4"`, `batch_size: eight`), naming key, value and the
  type expected, read from the constructor's type hints or, without one, from its default;
- a key next to `target`/`params` other than the model's `base_learning_rate`.

Keys the original code accepted and ignored (so released configs carry them) are listed in
`IGNORED_KEYS` with the reason; they pass. Everything else must be spelled as a constructor does.
"""
from __future__ import annotations

import collections.abc
import difflib
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any

from ldm.util import ConfigError, _where, get_obj_from_str

# Plain (target-less) dicts a constructor unpacks into other constructors: (class, param) -> consumers.
KWARGS_DICTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("AutoencoderKL", "ddconfig"): ("ldm.modules.diffusionmodules.model.Encoder",
                                    "ldm.modules.diffusionmodules.model.Decoder"),
    ("VQModel", "ddconfig"): ("ldm.modules.diffusionmodules.model.Encoder",
                              "ldm.modules.diffusionmodules.model.Decoder"),
}

# Keys released configs carry that the original code accepted and ignored: (class or '*', key) -> why.
IGNORED_KEYS: dict[tuple[str, str], str] = {
    ("*", "ignore_keys"): "checkpoint keys to drop; empty in every released config",
}

# Params holding whole configs as data (not built from them): not walked.
DATA_PARAMS = {("SetupCallback", "config"), ("SetupCallback", "lightning_config")}

# Top-level sections main.py reads, and those other tools' configs carry (accepted, unused by main.py).
TOP_LEVEL_SECTIONS = ("model", "data", "lightning")
IGNORED_TOP_LEVEL: dict[str, str] = {
    "diffusion": "Karlo (unCLIP) configs: read by the Karlo sampler, not by main.py",
    "sampling": "Karlo (unCLIP) configs: read by the Karlo sampler, not by main.py",
}
NODE_KEYS = ("target", "params")
MODEL_NODE_KEYS = NODE_KEYS + ("base_learning_rate",)
_SENTINELS = ("__is_first_stage__", "__is_unconditional__")
# Bases whose __init__ takes no keywords of a subclass's **kwargs (reaching one closes the set).
# Classes whose **kwargs go to another object than their base class (unknown keys pass there).
OPEN_KWARGS: set[str] = set()
_CLOSED_BASES = ("torch.nn.modules.module.Module", "pytorch_lightning.core.module.LightningModule",
                 "lightning.pytorch.core.module.LightningModule", "builtins.object",
                 "torch.utils.data.dataset.Dataset", "torch.utils.data.dataset.IterableDataset")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"


def check_sections(config: Mapping, where: str = "") -> None:
    """Unknown top-level sections of a main.py config are errors (with a did-you-mean)."""
    for key in config:
        if key in TOP_LEVEL_SECTIONS or key in IGNORED_TOP_LEVEL:
            continue
        hint = difflib.get_close_matches(str(key), TOP_LEVEL_SECTIONS, n=1)
        hint_s = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(f"unknown top-level section '{key}' (main.py reads {', '.join(TOP_LEVEL_SECTIONS)})"
                          f"{hint_s}{where or _where()}")


# ----------------------------------------------------------------------------------------
# Signatures
# ----------------------------------------------------------------------------------------
class Signature:
    """The keywords a target accepts, with type hints and defaults. A class that takes **kwargs
    accepts its bases' keywords too (they are forwarded by super().__init__); `open` when
    **kwargs go where we cannot see (a function's, or a class listed in OPEN_KWARGS)."""

    def __init__(self, obj: Any):
        self.params: dict[str, inspect.Parameter] = {}
        self.hints: dict[str, Any] = {}
        self.open = False
        if not inspect.isclass(obj):
            self.open = self._add(obj)
            return
        if _qualname(obj) in OPEN_KWARGS:
            self.open = True
        for cls in obj.__mro__:
            if _qualname(cls) in _CLOSED_BASES:
                break
            if "__init__" in cls.__dict__ and not self._add(cls.__dict__["__init__"]):
                break  # no **kwargs: nothing is forwarded further up

    def _add(self, func: Any) -> bool:
        """Add `func`'s keywords; True when it takes **kwargs."""
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            self.open = True
            return False
        try:
            hints = typing.get_type_hints(func)
        except Exception:  # noqa: BLE001 - unresolvable forward references: fall back to defaults
            hints = {}
        var_kw = False
        for name, p in sig.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                var_kw = True
            elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) \
                    and name != "self" and name not in self.params:
                self.params[name] = p
                if name in hints:
                    self.hints[name] = hints[name]
        return var_kw


# ----------------------------------------------------------------------------------------
# Types
# ----------------------------------------------------------------------------------------
def type_name(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def type_ok(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a type hint (unknown hints accept anything)."""
    if value is None or hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is type(None):
        return False  # value is not None here
    origin = typing.get_origin(hint)
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(hint, types.UnionType)):
        return any(type_ok(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    base = origin or hint
    if base is bool:
        return isinstance(value, bool) or value in (0, 1)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    if base in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence):
        return isinstance(value, (list, tuple))
    if base in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        return isinstance(value, Mapping) or isinstance(value, str) and value in _SENTINELS
    return True  # classes (nn.Module, torch.dtype, ...): a config gives them as targets or strings


def _expected(param: inspect.Parameter, hint: Any) -> Any:
    """The type hint, or the type of the default (int defaults accept floats too: 1 vs 1.0)."""
    if hint is not None:
        return hint
    d = param.default
    if d is inspect.Parameter.empty or d is None:
        return Any
    if isinstance(d, bool):
        return bool
    if isinstance(d, (int, float)):
        return float
    if isinstance(d, str):
        return str
    if isinstance(d, (list, tuple)):
        return list
    return Any


# ----------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------
def _did_you_mean(key: str, names: Any) -> str:
    hint = difflib.get_close_matches(str(key), sorted(names), n=1)
    return f"; did you mean '{hint[0]}'?" if hint else ""


def _unknown(target: str, path: str, key: str, names: Any) -> ConfigError:
    return ConfigError(f"unknown key '{path}' ({target} has no parameter '{key}'){_did_you_mean(key, names)}"
                       f"{_where()}")


def _check_value(target: str, path: str, key: str, value: Any, sig: Signature) -> None:
    param = sig.params.get(key)
    if param is None:
        return
    expected = _expected(param, sig.hints.get(key))
    if isinstance(value, Mapping) and "target" in value:
        return  # a nested config builds the object
    if isinstance(value, str) and (value in _SENTINELS or value.startswith("${")):
        return
    if not type_ok(value, expected):
        raise ConfigError(f"wrong type for '{path}': {value!r} ({type(value).__name__}) where {target} expects "
                          f"{type_name(expected)}{_where()}")


def _check_kwargs_dict(owner: str, path: str, value: Mapping, consumers: tuple[str, ...]) -> None:
    sigs = [(c, Signature(get_obj_from_str(c))) for c in consumers]
    names = set().union(*(s.params for _, s in sigs))
    for key, v in value.items():
        sub = f"{path}.{key}"
        if key not in names and not _ignored(owner, key):
            raise ConfigError(f"unknown key '{sub}' (none of {', '.join(c.rsplit('.', 1)[1] for c in consumers)} "
                              f"takes '{key}'){_did_you_mean(key, names)}{_where()}")
        for c, s in sigs:
            _check_value(c.rsplit(".", 1)[1], sub, key, v, s)


def _ignored(target: str, key: str) -> bool:
    short = target.rsplit(".", 1)[-1]
    return any((t, key) in IGNORED_KEYS for t in (target, short, "*"))


def check_config(config: Any, path: str = "") -> None:
    """Raise ConfigError for the first unknown key or wrong-typed value anywhere in `config`
    (a `{target, params}` mapping, or a mapping / list holding such nodes)."""
    from omegaconf import OmegaConf
    if OmegaConf.is_config(config):
        try:
            config = OmegaConf.to_container(config, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation only the full config resolves: check keys, not its value
            config = OmegaConf.to_container(config, resolve=False)
    _walk(config, path)


def _walk(node: Any, path: str) -> None:
    if isinstance(node, Mapping):
        if "target" in node:
            _check_node(node, path)
        else:
            for k, v in node.items():
                _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _walk(v, f"{path}[{i}]")


def _check_node(node: Mapping, path: str) -> None:
    target = str(node["target"])
    allowed = MODEL_NODE_KEYS if path.split(".")[-1] == "model" or not path else NODE_KEYS
    for key in node:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown key '{where}' next to target {target} (a config node holds "
                              f"{' and '.join(NODE_KEYS)}){_did_you_mean(key, allowed)}{_where()}")
    params = node.get("params") or {}
    ppath = f"{path}.params" if path else "params"
    if not isinstance(params, Mapping):
        raise ConfigError(f"'{ppath}' of {target} must be a mapping of keyword arguments, got {params!r}{_where()}")
    obj = get_obj_from_str(target)
    sig = Signature(obj)
    short = getattr(obj, "__name__", target.rsplit(".", 1)[-1])
    for key, value in params.items():
        kpath = f"{ppath}.{key}"
        if key not in sig.params and not sig.open and not _ignored(target, key):
            raise _unknown(target, kpath, str(key), sig.params)
        _check_value(target, kpath, str(key), value, sig)
        if (short, str(key)) in DATA_PARAMS:
            continue
        consumers = KWARGS_DICTS.get((short, str(key)))
        if consumers and isinstance(value, Mapping) and "target" not in value:
            _check_kwargs_dict(target, kpath, value, consumers)
        else:
            _walk(value, kpath)


__all__ = ["IGNORED_KEYS", "IGNORED_TOP_LEVEL", "KWARGS_DICTS", "TOP_LEVEL_SECTIONS", "check_config",
           "check_sections", "type_ok"]
