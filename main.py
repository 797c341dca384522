"""Train (and test) a model described by YAML configs: the original `main.py` CLI on Lightning 2.

    python main.py --base configs/quickstart/autoencoder_kl_digits.yaml -t [--gpus 0,1] [key.path=value ...]
    python main.py --resume logs/<run>            # continues training (implies -t); or logs/<run>/checkpoints/<file>.ckpt

Configs are merged left to right, then `a.b=c` overrides. Sections: `model` (with
`base_learning_rate`), `data` (usually `main.DataModuleFromConfig`), and `lightning`
(`trainer`, `callbacks`, `logger`, `modelcheckpoint`), merged over the defaults of
ldm.training.config. A run writes logs/<YYYY-mm-ddTHH-MM-SS>_<name>/{configs,checkpoints,images,tensorboard}.
`last.ckpt` is written atomically at the end (and at every checkpoint, on SIGUSR1, on a failure);
`-r` restores weights, optimizers, schedulers, EMA, step, epoch, data order and RNG state
(ldm.training.resume: what it refuses and how changed optimizer settings are applied).
A run holds <logdir>/run.lock (ldm.training.runlock); NaN/inf steps stop or are skipped by
ldm.training.nan_guard, and no checkpoint is ever written from non-finite weights.

Multi-GPU / multi-node: Lightning DDP (`--gpus 0,1`, `lightning.trainer.num_nodes`,
`lightning.trainer.strategy: fsdp`), started by main.py itself, torchrun or SLURM. On CPU,
`lightning.trainer.devices=2 lightning.trainer.strategy=ddp` runs two gloo processes.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import traceback
from typing import Any, Optional

if __name__ == "__main__":  # before the slow imports: a SIGUSR1 while starting must not kill (main() installs the real one)
    import signal as _signal
    if hasattr(_signal, "SIGUSR1"):
        _signal.signal(_signal.SIGUSR1, lambda *_: os.write(2, b"SIGUSR1 received while starting: ignored\n"))

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning import seed_everything
from pytorch_lightning.callbacks import LearningRateMonitor  # noqa: F401  (configs name main.LearningRateMonitor)
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.model_helpers import is_overridden

from ldm import training
from ldm.training import finetune
# Configs name these as main.<Name>; they live in ldm.training.
from ldm.training import (CUDACallback, DataModuleFromConfig, ImageLogger, SetupCallback,  # noqa: F401
                          WrappedDataset, worker_init_fn)
from ldm.util import ConfigError, config_source

__all__ = ["CUDACallback", "DataModuleFromConfig", "ImageLogger", "LearningRateMonitor", "SetupCallback",
           "WrappedDataset", "worker_init_fn", "get_parser", "main"]
BOOL_FLAGS = ("-t", "--train", "--no-test", "-d", "--debug", "--scale_lr")


def str2bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("Boolean value expected.")


def get_parser(**parser_kwargs: Any) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(**parser_kwargs)
    parser.add_argument("-n", "--name", type=str, const=True, default="", nargs="?", help="postfix for logdir")
    parser.add_argument("-r", "--resume", type=str, const=True, default="", nargs="?",
                        help="resume from logdir or checkpoint in logdir")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=list(),
                        help="paths to base configs, merged left to right; `key.path=value` arguments override them")
    parser.add_argument("-t", "--train", type=str2bool, const=True, default=None, nargs="?",
                        help="train (implied by -r/--resume: a resumed run continues training; -t false only tests)")
    parser.add_argument("--no-test", type=str2bool, const=True, default=False, nargs="?", help="disable test")
    parser.add_argument("-p", "--project", help="group the run under <logdir>/<project>/ (and name the wandb project)")
    parser.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
                        help="post-mortem debugging; the run is moved to <logdir>/debug_runs")
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    parser.add_argument("-f", "--postfix", type=str, default="", help="post-postfix for default name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="directory for logging")
    parser.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                        help="scale base-lr by num_devices * batch_size * accumulate_grad_batches")
    parser.add_argument("--gpus", type=str, default=None, help="GPU ids, e.g. 0,1 (absent: as the config says, else CPU)")
    finetune.add_arguments(parser)  # --finetune_from, --finetune_ema
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Like parse_known_args, but a bool flag followed by an override (`-t model.x=1`) stays a
    flag, and overrides placed after `--base a.yaml` are not taken for config files."""
    fixed: list[str] = []
    for i, arg in enumerate(argv):
        fixed.append(arg)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in BOOL_FLAGS and nxt is not None and not nxt.startswith("-"):
            try:
                str2bool(nxt)
            except argparse.ArgumentTypeError:
                fixed.append("true")
    opt, unknown = get_parser().parse_known_args(fixed)
    overrides = [b for b in opt.base if "=" in b and not os.path.exists(b)]
    opt.base = [b for b in opt.base if b not in overrides]
    return opt, overrides + unknown


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------
def build_trainer(opt: argparse.Namespace, run: training.RunDirs, now: str, config: Any, lightning_config: Any,
                  sources: dict[str, str], model: pl.LightningModule) -> tuple[pl.Trainer, Optional[str]]:
    """Trainer from the lightning section: translated trainer kwargs, logger, callbacks, atomic checkpoints."""
    lsrc = sources.get("lightning", "")
    unknown = set(lightning_config.keys()) - {"trainer", "callbacks", "logger", "modelcheckpoint",
                                              "find_unused_parameters"}
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in the lightning section (in {lsrc})")
    with config_source(lsrc):
        trainer_kwargs, cfg_resume = training.trainer_kwargs_from_config(
            lightning_config.get("trainer", {}), gpus=opt.gpus,
            find_unused_parameters=lightning_config.get("find_unused_parameters"))
    if trainer_kwargs.get("accelerator") == "gpu" and not torch.cuda.is_available():
        asked = f"--gpus {opt.gpus}" if opt.gpus is not None else f"lightning.trainer.gpus ({lsrc})"
        raise ConfigError(f"{asked} asks for GPU(s) {trainer_kwargs.get('devices')}, but no CUDA device was found "
                          f"(torch.cuda.is_available() is False). To run on the CPU, leave out --gpus "
                          f"(and set lightning.trainer.gpus=null if the config names GPUs).")
    accumulate = int(trainer_kwargs.get("accumulate_grad_batches", 1))
    if accumulate > 1 and not model.automatic_optimization and hasattr(model, "accumulate_grad_batches"):
        # Lightning refuses accumulation with manual optimisation (AutoencoderKL, VQModel): the model does it
        model.accumulate_grad_batches = trainer_kwargs.pop("accumulate_grad_batches")
        rank_zero_info(f"accumulate_grad_batches = {accumulate} (done by {type(model).__name__} itself)")
    rank_zero_info(f"Running on {trainer_kwargs.get('accelerator', 'cpu')} "
                   f"devices={trainer_kwargs.get('devices', 1)} strategy={trainer_kwargs.get('strategy', 'auto')}")
    logger_cfg = training.logger_config(lightning_config, run.logdir, run.nowname, opt.debug, opt.project)
    modelckpt_cfg = training.modelcheckpoint_config(lightning_config, run.ckptdir, getattr(model, "monitor", None))
    setup_params = {"resume": opt.resume or "", "now": now, "logdir": run.logdir, "ckptdir": run.ckptdir,
                    "cfgdir": run.cfgdir, "config": config, "lightning_config": lightning_config}
    callbacks_cfg = training.callbacks_config(lightning_config, setup_params, run.ckptdir, modelckpt_cfg,
                                              run.ckpt or cfg_resume)
    logger = training.instantiate_in(lsrc, logger_cfg, path="lightning.logger")
    callbacks = [training.instantiate_in(lsrc, callbacks_cfg[k], path=f"lightning.callbacks.{k}") for k in callbacks_cfg]
    callbacks.append(training.RNGStateCallback())
    callbacks.append(training.ResumedOptimizerSettings())
    plugins = list(trainer_kwargs.pop("plugins", None) or [])
    if not any(isinstance(p, pl.plugins.io.CheckpointIO) for p in plugins):
        plugins.append(training.AtomicCheckpointIO())
    trainer = pl.Trainer(**trainer_kwargs, logger=logger, callbacks=callbacks, plugins=plugins,
                         default_root_dir=run.logdir)
    trainer.logdir = run.logdir
    lightning_config.trainer = OmegaConf.merge(lightning_config.get("trainer", {}),
                                               {"accumulate_grad_batches": accumulate})
    return trainer, cfg_resume


def set_learning_rate(model: pl.LightningModule, trainer: pl.Trainer, config: Any, scale_lr: bool,
                      accumulate: int) -> None:
    """model.learning_rate from base_learning_rate (scaled by the effective batch), printed and logged."""
    bs, base_lr = config.data.params.batch_size, config.model.base_learning_rate
    n_devices = trainer.num_devices * trainer.num_nodes
    lr, how = training.scaled_learning_rate(base_lr, bs, n_devices, accumulate, scale_lr)
    model.learning_rate = lr
    rank_zero_info(how)
    if trainer.logger is not None:
        trainer.logger.log_hyperparams({"learning_rate": lr, "base_learning_rate": base_lr, "batch_size": bs,
                                        "num_devices": n_devices, "accumulate_grad_batches": accumulate})


def main(argv: Optional[list[str]] = None) -> int:
    training.install_sigusr1_handler()  # from the start: SIGUSR1 saves (while training) or is ignored, never kills
    opt, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if opt.name and opt.resume:
        raise ConfigError("-n/--name and -r/--resume cannot be specified both. To resume training in a new log "
                          "folder, use -n/--name with lightning.trainer.resume_from_checkpoint=<ckpt>")
    if opt.resume is True or opt.name is True:
        raise ConfigError("-r/--resume needs a log folder or checkpoint, -n/--name a name")
    if opt.train is None:
        opt.train = bool(opt.resume)
        if opt.resume:
            rank_zero_info("resuming training (-r implies -t; pass -t false to only run the test split)")
    if opt.resume and os.path.isdir(opt.resume) and training.launcher_process():
        training.RunLock(opt.resume).ensure_free()  # a live writer first, before "no checkpoint yet"
    now = training.run_timestamp()
    run = training.resolve_run_dirs(now, opt.resume, opt.name, tuple(opt.base), opt.logdir, opt.postfix,
                                    opt.project)
    seed_everything(opt.seed, workers=True)
    config, lightning_config, sources = training.load_configs(list(run.resumed_configs) + opt.base, overrides)
    for section in ("model", "data"):
        if section not in config:
            raise ConfigError(f"no `{section}` section in {', '.join(list(run.resumed_configs) + opt.base) or 'no config'}")
    training.check_run_config(config, lightning_config, sources)  # every key and type, before building

    lock = None
    if training.launcher_process():  # one writer per log folder; a read-only / full disk is said first
        fresh_dir = not os.path.exists(run.logdir)
        training.check_writable(run.logdir)
        lock = training.RunLock(run.logdir).acquire()
        training.remove_stale_tmp_files(run.logdir)
    try:
        return _run(opt, run, now, config, lightning_config, sources)
    finally:
        if lock is not None:
            lock.release()
            if fresh_dir and os.path.isdir(run.logdir) and not os.listdir(run.logdir):
                os.rmdir(run.logdir)  # failed before writing anything: leave no empty log folder


def _run(opt: argparse.Namespace, run: training.RunDirs, now: str, config: Any, lightning_config: Any,
         sources: dict[str, str]) -> int:
    model = training.instantiate_in(sources["model"], config.model, path="model")
    finetune.apply(model, opt, run.logdir)  # --finetune_from: weights of another run / a released checkpoint
    trainer, cfg_resume = build_trainer(opt, run, now, config, lightning_config, sources, model)
    if opt.train and (run.ckpt or cfg_resume):
        training.check_resume_checkpoint(model, run.ckpt or cfg_resume)
    data = training.instantiate_in(sources["data"], config.data, path="data")
    with config_source(sources["data"]):
        data.prepare_data()
        data.setup()
    rank_zero_info("#### Data #####")
    for k, ds in getattr(data, "datasets", {}).items():
        rank_zero_info(f"{k}, {ds.__class__.__name__}, {len(ds) if hasattr(ds, '__len__') else '?'}")
    set_learning_rate(model, trainer, config, opt.scale_lr, int(lightning_config.trainer.accumulate_grad_batches))

    set_env = training.RUN_NOW_ENV not in os.environ
    os.environ[training.RUN_NOW_ENV] = now  # DDP workers Lightning starts inherit it: one log dir for all ranks
    try:
        if opt.train:
            trainer.fit(model, data, ckpt_path=run.ckpt or cfg_resume)
        if not opt.no_test and not trainer.interrupted and is_overridden("test_step", model) \
                and "test" in getattr(data, "dataset_configs", {}):
            trainer.test(model, data)
    except Exception:
        if opt.debug and trainer.global_rank == 0 and sys.stdin.isatty():
            import pdb
            traceback.print_exc()
            pdb.post_mortem()
        raise
    finally:
        if set_env:
            os.environ.pop(training.RUN_NOW_ENV, None)
        if opt.debug and not opt.resume and trainer.global_rank == 0 and os.path.isdir(run.logdir):
            dst = os.path.join(os.path.dirname(run.logdir), "debug_runs", os.path.basename(run.logdir))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.move(run.logdir, dst)
    return 0


if __name__ == "__main__":
    sys.path.append(os.getcwd())  # configs name `main.DataModuleFromConfig` etc.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"main.py: config error: {err}", file=sys.stderr)
        sys.exit(2)
    except training.USER_ERRORS as err:  # a bad file, a locked or unwritable folder, a NaN: the message says it all
        print(f"main.py: error: {err}", file=sys.stderr)
        sys.exit(3 if isinstance(err, training.NonFiniteError) else 2)
    finally:
        if hasattr(_signal, "SIGUSR1"):  # Python resets handlers at exit; SIG_IGN survives: a late SIGUSR1 is no kill
            _signal.signal(_signal.SIGUSR1, _signal.SIG_IGN)
