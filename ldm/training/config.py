"""How main.py reads a run: log folders and resuming, configs merged with file-named errors,
a (Lightning 1 era) `lightning.trainer` section translated into Lightning 2 `Trainer` arguments,
learning-rate scaling, and the default logger / callback configs merged under the user's."""
from __future__ import annotations

import datetime
import difflib
import glob
import inspect
import os
from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from ldm.util import ConfigError, config_path, config_source, instantiate_from_config
from ldm.util import _where  # the YAML named by the enclosing config_source()

RUN_NOW_ENV = "LDM_RUN_NOW"  # shared with the DDP worker processes Lightning starts, so all use one log dir


# ----------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------
@dataclass
class RunDirs:
    logdir: str  # logs/<now>_<name>
    nowname: str  # the log folder's name
    ckpt: Optional[str] = None  # checkpoint to resume from
    resumed_configs: tuple[str, ...] = ()  # configs/*.yaml of the run being resumed

    @property
    def ckptdir(self) -> str:
        return os.path.join(self.logdir, "checkpoints")

    @property
    def cfgdir(self) -> str:
        return os.path.join(self.logdir, "configs")


def run_timestamp() -> str:
    """`YYYY-mm-ddTHH-MM-SS`; a DDP worker process reuses its launcher's, so all ranks agree."""
    return os.environ.get(RUN_NOW_ENV) or datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


def resolve_run_dirs(now: str, resume: str = "", name: str = "", base: tuple[str, ...] = (),
                     logdir: str = "logs", postfix: str = "", project: Optional[str] = None) -> RunDirs:
    """Where this run logs, and what it resumes: `resume` is a log folder or a checkpoint in one."""
    if resume:
        if not os.path.exists(resume):
            raise FileNotFoundError(f"cannot resume: '{resume}' does not exist")
        if os.path.isfile(resume):
            ckpt = resume
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(resume)))
            if os.path.basename(os.path.dirname(os.path.abspath(resume))) != "checkpoints":
                from ldm.training.resume import ResumeError, weights_instead
                raise ResumeError(f"cannot resume from '{resume}': -r takes a main.py log folder or "
                                  f"<logdir>/checkpoints/<file>.ckpt; " + weights_instead(resume))
        else:
            run_dir = resume.rstrip("/")
            ckpt = os.path.join(run_dir, "checkpoints", "last.ckpt")
            if not os.path.isfile(ckpt):
                # e.g. killed while writing its first last.ckpt: the newest other checkpoint of the run
                others = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.ckpt")),
                                key=os.path.getmtime)
                if not others:
                    raise FileNotFoundError(f"cannot resume from '{resume}': no checkpoint at {ckpt}")
                rank_zero_info(f"{ckpt} does not exist; resuming from the newest checkpoint of the run, {others[-1]}")
                ckpt = others[-1]
        configs = tuple(sorted(glob.glob(os.path.join(run_dir, "configs", "*.yaml"))))
        return RunDirs(run_dir, os.path.basename(run_dir), ckpt, configs)
    if name:
        suffix = "_" + name
    elif base:
        suffix = "_" + os.path.splitext(os.path.basename(base[0]))[0]
    else:
        suffix = ""
    nowname = now + suffix + postfix
    root = os.path.join(logdir, project) if project else logdir
    return RunDirs(os.path.join(root, nowname), nowname)


# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------
def load_yaml(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file '{path}' does not exist")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and OmegaConf grammar errors
        raise ConfigError(f"cannot parse config file '{path}': {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping at top level")
    return cfg


def drop_replaced_params(base: DictConfig, layer: DictConfig) -> None:
    """Where `layer` sets a `target` different from the one in `base`, delete that node's
    `params` from `base`: a replaced class gets its params only from the layer that named it
    (and later ones), never the previous class's (e.g. `crop_size` of a shipped dataset)."""
    for key in layer:
        if key not in base:
            continue
        b, o = base._get_node(key), layer._get_node(key)
        if not (OmegaConf.is_dict(b) and OmegaConf.is_dict(o)):
            continue
        if "target" in o and "target" in b and str(o.get("target")) != str(b.get("target")):
            if "params" in b:
                b.pop("params")
        else:
            drop_replaced_params(b, o)


def merge_layers(layers: list[DictConfig]) -> DictConfig:
    """OmegaConf.merge left to right, except that a changed `target` drops the earlier params."""
    config = OmegaConf.create()
    for layer in layers:
        drop_replaced_params(config, layer)
        config = OmegaConf.merge(config, layer)
    return config


def load_configs(paths: list[str], dotlist: list[str]) -> tuple[DictConfig, DictConfig, dict[str, str]]:
    """Merge YAMLs left to right, then `a.b=c` overrides. Returns (config without `lightning`,
    the `lightning` section, {section: 'file(s) that set it'} for error messages)."""
    configs = [load_yaml(p) for p in paths]
    bad = [d for d in dotlist if "=" not in d or d.startswith("-")]
    if bad:
        raise ConfigError(f"unrecognised command-line arguments {bad}: overrides look like `model.params.key=value`")
    try:
        cli = OmegaConf.from_dotlist(dotlist)
    except Exception as e:
        raise ConfigError(f"cannot parse command-line overrides {dotlist}: {e}") from e
    config = merge_layers([*configs, cli])
    sources: dict[str, str] = {}
    for section in set(config.keys()):
        files = [p for p, c in zip(paths, configs) if section in c]
        if section in cli:
            files.append("command line")
        sources[str(section)] = ", ".join(files)
    lightning_config = config.pop("lightning", OmegaConf.create())
    sources.setdefault("lightning", ", ".join(paths))
    return config, lightning_config, sources


def pl_target(target: str) -> str:
    """Targets written for the `lightning` package (SD 2 configs) resolve to `pytorch_lightning`."""
    legacy = {"pytorch_lightning.loggers.TestTubeLogger": "pytorch_lightning.loggers.TensorBoardLogger"}
    if target.startswith("lightning.pytorch."):
        target = "pytorch_lightning." + target[len("lightning.pytorch."):]
    return legacy.get(target, target)


# ----------------------------------------------------------------------------------------
# lightning.trainer -> Trainer(**kwargs)
# ----------------------------------------------------------------------------------------
TRAINER_KEYS = frozenset(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
# Lightning 1 keys that have no Lightning 2 counterpart and change nothing essential: dropped with a warning.
OBSOLETE_KEYS = frozenset({
    "flush_logs_every_n_steps", "log_gpu_memory", "amp_backend", "amp_level",
    "auto_select_gpus", "track_grad_norm", "prepare_data_per_node", "move_metrics_to_cpu",
    "weights_save_path", "process_position", "auto_lr_find", "auto_scale_batch_size", "stochastic_weight_avg",
    "multiple_trainloader_mode", "truncated_bptt_steps", "reload_dataloaders_every_epoch"})
LIGHTNING1_STRATEGIES = ("ddp", "ddp_spawn", "ddp2", "dp", "ddp_cpu", "ddp_sharded", "horovod")
PRECISIONS = {16: "16-mixed", "16": "16-mixed", 32: "32-true", "32": "32-true", 64: "64-true", "64": "64-true",
              "bf16": "bf16-mixed", "b16": "bf16-mixed"}


def parse_gpus(gpus: Any, as_list: bool = False) -> Optional[list[int] | int]:
    """Lightning 1 `gpus` -> Trainer `devices`: '0,1' / '0,' / [0, 1] are device ids; an int (or a
    string without a comma) is a count, 0 meaning CPU (-> None). With `as_list` (the `--gpus`
    flag) a lone number is a device id: `--gpus 0` is GPU 0."""
    if gpus is None or isinstance(gpus, bool):
        return None
    if isinstance(gpus, (list, tuple)) or OmegaConf.is_list(gpus):
        return [int(g) for g in gpus] or None
    text = str(gpus).strip()
    if "," in text or as_list:
        ids = [int(x) for x in text.split(",") if x.strip()]
        return ids or None
    n = int(text)
    return None if n == 0 else n


def trainer_kwargs_from_config(trainer_config: Any, gpus: Optional[str] = None,
                               find_unused_parameters: Optional[bool] = None) -> tuple[dict[str, Any], Optional[str]]:
    """The `lightning.trainer` section (+ `--gpus`) as Lightning 2 Trainer kwargs, and a
    `resume_from_checkpoint` path if the section named one. Unknown keys raise ConfigError."""
    cfg = dict(OmegaConf.to_container(trainer_config, resolve=True) if OmegaConf.is_config(trainer_config)
               else (trainer_config or {}))
    out: dict[str, Any] = {}
    resume_ckpt = cfg.pop("resume_from_checkpoint", None)
    cfg.pop("terminate_on_nan", None)  # the non-finite guard's business (callbacks_config)
    for key, value in cfg.items():
        if key == "gpus":
            devices = parse_gpus(value)
            if devices is not None:
                out["accelerator"], out["devices"] = "gpu", devices
        elif key in ("accelerator", "distributed_backend") and value in LIGHTNING1_STRATEGIES:
            out["strategy"] = {"ddp_cpu": "ddp", "ddp2": "ddp", "ddp_sharded": "ddp", "dp": "auto"}.get(value, value)
        elif key == "distributed_backend":
            out["strategy"] = value
        elif key == "num_processes":
            out.setdefault("accelerator", "cpu")
            out["devices"] = value
        elif key == "tpu_cores":
            out["accelerator"], out["devices"] = "tpu", value
        elif key == "checkpoint_callback":
            out["enable_checkpointing"] = bool(value)
        elif key == "weights_summary":
            out["enable_model_summary"] = value is not None
        elif key == "progress_bar_refresh_rate":
            out["enable_progress_bar"] = bool(value)
        elif key == "replace_sampler_ddp":
            out["use_distributed_sampler"] = bool(value)
        elif key == "precision":
            out["precision"] = PRECISIONS.get(value, value)
        elif key == "max_steps" and value is None:
            out["max_steps"] = -1
        elif key == "strategy" and isinstance(value, dict):
            value = dict(value, target=pl_target(str(value.get("target", ""))))
            out["strategy"] = instantiate_from_config(value)
        elif key in OBSOLETE_KEYS:
            rank_zero_warn(f"lightning.trainer.{key} has no effect in Lightning 2; ignored")
        elif key in TRAINER_KEYS:
            _check_trainer_type(key, value)
            out[key] = value
        else:
            hint = difflib.get_close_matches(key, sorted(TRAINER_KEYS), n=1)
            hint_s = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"unknown lightning.trainer key '{key}' (not a Lightning 2 Trainer argument)"
                              f"{hint_s}{_where()}")
    if gpus is not None:  # --gpus wins over the config
        devices = parse_gpus(gpus, as_list=True)
        if devices is not None:
            out["accelerator"], out["devices"] = "gpu", devices
    out.setdefault("accelerator", "cpu")  # as the original: no GPUs unless asked for
    if find_unused_parameters and out.get("strategy", "auto") in ("ddp", "auto") and _n_devices(out) > 1:
        out["strategy"] = "ddp_find_unused_parameters_true"
    return out, resume_ckpt


def _check_trainer_type(key: str, value: Any) -> None:
    """A lightning.trainer value of the wrong type (`max_steps=abc`) is a ConfigError naming it."""
    from ldm.config_schema import type_name, type_ok
    global _TRAINER_HINTS
    if _TRAINER_HINTS is None:
        import typing
        try:
            _TRAINER_HINTS = typing.get_type_hints(pl.Trainer.__init__)
        except Exception:  # noqa: BLE001 - unresolvable hints: no type checks
            _TRAINER_HINTS = {}
    hint = _TRAINER_HINTS.get(key)
    if hint is not None and not type_ok(value, hint):
        raise ConfigError(f"wrong type for 'lightning.trainer.{key}': {value!r} ({type(value).__name__}) where "
                          f"the Lightning Trainer expects {type_name(hint)}{_where()}")


_TRAINER_HINTS: Optional[dict[str, Any]] = None


def _n_devices(kwargs: dict[str, Any]) -> int:
    """Devices asked for per node (2 standing for 'more than one' where Lightning decides)."""
    devices = kwargs.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text in ("-1", "auto"):
        return 2
    return len([d for d in text.split(",") if d.strip()]) if "," in text else int(text)


# ----------------------------------------------------------------------------------------
# Learning rate
# ----------------------------------------------------------------------------------------
def scaled_learning_rate(base_lr: float, batch_size: int, n_devices: int, accumulate_grad_batches: int,
                         scale_lr: bool = True) -> tuple[float, str]:
    """lr = accumulate_grad_batches * n_devices * batch_size * base_lr (the original's rule), and how."""
    if not scale_lr:
        return base_lr, f"Setting learning rate to {base_lr:.2e} (--scale_lr false: base_learning_rate as is)"
    lr = accumulate_grad_batches * n_devices * batch_size * base_lr
    return lr, (f"Setting learning rate to {lr:.2e} = {accumulate_grad_batches} (accumulate_grad_batches) * "
                f"{n_devices} (num_devices) * {batch_size} (batchsize) * {base_lr:.2e} (base_lr)")


# ----------------------------------------------------------------------------------------
# Default logger and callback configs (merged under the config's lightning.* sections)
# ----------------------------------------------------------------------------------------
def tensorboard_available() -> bool:
    import importlib.util
    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


def logger_config(lightning_config: DictConfig, logdir: str, nowname: str, debug: bool = False,
                  project: Optional[str] = None) -> DictConfig:
    defaults = {
        "wandb": {"target": "pytorch_lightning.loggers.WandbLogger",
                  "params": {"name": nowname, "save_dir": logdir, "offline": debug, "id": nowname,
                             **({"project": project} if project else {})}},
        "tensorboard": {"target": "pytorch_lightning.loggers.TensorBoardLogger",
                        "params": {"name": "tensorboard", "save_dir": logdir, "version": ""}},
        "csv": {"target": "pytorch_lightning.loggers.CSVLogger",
                "params": {"name": "csv", "save_dir": logdir, "version": ""}},
    }
    default = defaults["tensorboard" if tensorboard_available() else "csv"]
    cfg = OmegaConf.merge(default, lightning_config.get("logger", OmegaConf.create()))
    cfg.target = pl_target(cfg.target)
    return cfg


def modelcheckpoint_config(lightning_config: DictConfig, ckptdir: str, monitor: Optional[str]) -> DictConfig:
    default: dict[str, Any] = {"target": "ldm.training.checkpointing.LDMModelCheckpoint",
                               "params": {"dirpath": ckptdir, "filename": "{epoch:06}", "verbose": True,
                                          "save_last": True}}
    if monitor:
        rank_zero_info(f"Monitoring {monitor} as checkpoint metric.")
        default["params"].update(monitor=monitor, save_top_k=3)
    cfg = OmegaConf.merge(default, lightning_config.get("modelcheckpoint", OmegaConf.create()))
    if pl_target(cfg.target) == "pytorch_lightning.callbacks.ModelCheckpoint":
        cfg.target = "ldm.training.checkpointing.LDMModelCheckpoint"  # same arguments, plus the final-step last.ckpt
    return cfg


def callbacks_config(lightning_config: DictConfig, setup_params: dict[str, Any], ckptdir: str,
                     modelckpt_cfg: DictConfig, resume_ckpt: Optional[str]) -> DictConfig:
    defaults: dict[str, Any] = {
        "setup_callback": {"target": "main.SetupCallback", "params": setup_params},
        "image_logger": {"target": "main.ImageLogger",
                         "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
        "learning_rate_logger": {"target": "main.LearningRateMonitor", "params": {"logging_interval": "step"}},
        "cuda_callback": {"target": "main.CUDACallback"},
        "checkpoint_callback": modelckpt_cfg,
        "nan_guard": {"target": "ldm.training.nan_guard.NonFiniteGuard", "params": {"max_skips": 0}},
    }
    user = lightning_config.get("callbacks", OmegaConf.create())
    if "metrics_over_trainsteps_checkpoint" in user:
        rank_zero_info("Caution: saving checkpoints every n train steps without deleting; needs free space.")
        defaults["metrics_over_trainsteps_checkpoint"] = {
            "target": "pytorch_lightning.callbacks.ModelCheckpoint",
            "params": {"dirpath": os.path.join(ckptdir, "trainstep_checkpoints"), "filename": "{epoch:06}-{step:09}",
                       "verbose": True, "save_top_k": -1, "every_n_train_steps": 10000, "save_weights_only": True}}
    cfg = OmegaConf.merge(defaults, user)
    if lightning_config.get("trainer", {}).get("terminate_on_nan"):  # Lightning 1: stop at the first NaN
        rank_zero_info("lightning.trainer.terminate_on_nan: the non-finite guard stops at the first NaN/inf")
        cfg.nan_guard.params["max_skips"] = 0
    if "ignore_keys_callback" in cfg:
        if resume_ckpt:
            cfg.ignore_keys_callback.params["ckpt_path"] = resume_ckpt
        else:
            del cfg["ignore_keys_callback"]
    for k in cfg:
        cfg[k].target = pl_target(cfg[k].target)
    return cfg


def check_run_config(config: DictConfig, lightning_config: DictConfig, sources: dict[str, str]) -> None:
    """Unknown top-level sections, and unknown keys / wrong types anywhere in `model` and `data`,
    are ConfigErrors naming the key path and the file(s) that set the section."""
    from ldm.config_schema import check_config, check_sections
    for key in config.keys():
        check_sections([key], f" (in {sources.get(str(key), 'the configs')})")
    for section in ("model", "data"):
        with config_source(sources.get(section, "")), config_path(section):
            check_config(config[section], section)
    with config_source(sources.get("lightning", "")):  # also before building: trainer value types, callbacks
        for key, value in (lightning_config.get("trainer") or {}).items():
            if key in TRAINER_KEYS and not OmegaConf.is_config(value):
                _check_trainer_type(str(key), value)
        for section in ("callbacks", "logger"):
            if section in lightning_config:
                check_config(lightning_config[section], f"lightning.{section}")


def instantiate_in(source: str, config: Any, path: str = "", **extra: Any) -> Any:
    """instantiate_from_config, with errors naming `source` (the YAML files of that section)
    and key paths under `path` (e.g. `model`)."""
    with config_source(source), config_path(path):
        return instantiate_from_config(config, **extra)
