"""The pieces of `main.py`, the training CLI: config handling (`config`), the data module
(`data`), callbacks (`callbacks`) and crash-safe checkpointing (`checkpointing`)."""
from ldm.training.callbacks import CUDACallback, ImageLogger, SetupCallback
from ldm.checkpoint import CheckpointError
from ldm.training.checkpointing import (AtomicCheckpointIO, LDMModelCheckpoint, RNGStateCallback,
                                        after_module_train_batch_end, install_sigusr1_handler,
                                        remove_stale_tmp_files, save_last_checkpoint_now)
from ldm.training.nan_guard import NonFiniteError, NonFiniteGuard
from ldm.training.resume import ResumedOptimizerSettings, ResumeError, check_resume_checkpoint
from ldm.training.runlock import LogFolderError, RunLock, RunLockedError, check_writable, launcher_process
from ldm.training.config import (RUN_NOW_ENV, RunDirs, callbacks_config, check_run_config, instantiate_in, load_configs, load_yaml,
                                 logger_config, modelcheckpoint_config, parse_gpus, pl_target, resolve_run_dirs,
                                 run_timestamp, scaled_learning_rate, trainer_kwargs_from_config)
from ldm.training.data import DataModuleFromConfig, WrappedDataset, worker_init_fn

# Errors whose message is the whole story: main.py prints it in one line, without a traceback.
USER_ERRORS = (CheckpointError, LogFolderError, NonFiniteError, RunLockedError, FileNotFoundError)

__all__ = [
    "USER_ERRORS", "CheckpointError", "NonFiniteError", "NonFiniteGuard", "ResumedOptimizerSettings", "ResumeError",
    "check_resume_checkpoint", "install_sigusr1_handler", "remove_stale_tmp_files", "LogFolderError", "RunLock",
    "RunLockedError", "check_writable", "launcher_process",
    "AtomicCheckpointIO", "CUDACallback", "DataModuleFromConfig", "ImageLogger", "LDMModelCheckpoint",
    "RNGStateCallback", "RUN_NOW_ENV", "RunDirs", "SetupCallback", "WrappedDataset", "after_module_train_batch_end",
    "callbacks_config", "check_run_config", "instantiate_in", "load_configs", "load_yaml", "logger_config", "modelcheckpoint_config",
    "parse_gpus", "pl_target", "resolve_run_dirs", "run_timestamp", "save_last_checkpoint_now",
    "scaled_learning_rate", "trainer_kwargs_from_config", "worker_init_fn",
]
