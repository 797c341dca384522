"""Learning-rate multipliers for `torch.optim.lr_scheduler.LambdaLR` (configs' `scheduler_config`).

Each object maps the global step n to a factor of the base learning rate via `.schedule(n)`
(also `obj(n)`); the diffusion models step LambdaLR every training step.

* LambdaWarmUpCosineScheduler: linear warm-up lr_start -> lr_max, then half a cosine down to
  lr_min at max_decay_steps (constant after).
* LambdaWarmUpCosineScheduler2: the same per cycle, with factors f_*, for a list of cycles.
* LambdaLinearScheduler: per cycle, linear warm-up then a linear ramp from f_max (cycle start)
  towards f_min (cycle end); SD uses one endless cycle with f_max = f_min = 1 (warm-up only).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


class LambdaWarmUpCosineScheduler:
    """note: use with a base_lr of 1.0"""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                 verbosity_interval: int = 0):
        # warm_up_steps: steps of the linear warm-up from lr_start to lr_max
        # lr_min: value reached at max_decay_steps (and kept)
        # lr_max: value at the end of the warm-up
        # lr_start: value at step 0
        # max_decay_steps: step where the cosine decay ends
        # verbosity_interval: log the value every this many steps (0: never)
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.last_lr = 0.
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs) -> float:
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %s", n, self.last_lr)
        if n < self.lr_warm_up_steps:
            lr = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        else:
            t = (n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps)
            t = min(t, 1.0)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + np.cos(t * np.pi))
        self.last_lr = float(lr)   # Python floats: numpy scalars in checkpointed state break weights_only resume
        return self.last_lr

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Cosine schedule with warm-up per cycle; supports repeated iterations (configurable via lists).
    note: use with a base_lr of 1.0."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        # warm_up_steps, f_min, f_max, f_start, cycle_lengths: one entry per cycle (equal lengths)
        # verbosity_interval: log the value every this many steps (0: never)
        if not (len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == len(cycle_lengths)):
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle")
        self.lr_warm_up_steps = [int(v) for v in warm_up_steps]
        self.f_start = [float(v) for v in f_start]
        self.f_min = [float(v) for v in f_min]
        self.f_max = [float(v) for v in f_max]
        self.cycle_lengths = [int(v) for v in cycle_lengths]
        # plain Python numbers: the scheduler's __dict__ is its state in checkpoints, which load with weights_only
        self.cum_cycles = [int(c) for c in np.cumsum([0] + list(self.cycle_lengths))]
        self.last_f = 0.
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle step n falls into."""
        interval = 0
        for cl in self.cum_cycles[1:]:
            if n <= cl:
                return interval
            interval += 1
        raise ValueError(f"step {n} is past the last cycle (total length {self.cum_cycles[-1]})")

    def _log(self, n: int, cycle: int) -> None:
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %s, current cycle %d", n, self.last_f, cycle)

    def schedule(self, n: int, **kwargs) -> float:
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        self._log(n, cycle)
        if n < self.lr_warm_up_steps[cycle]:
            f = (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        else:
            t = (n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle])
            t = min(t, 1.0)
            f = self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1 + np.cos(t * np.pi))
        self.last_f = float(f)
        return self.last_f

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Linear warm-up, then linear from f_max at the cycle start towards f_min at its end."""

    def schedule(self, n: int, **kwargs) -> float:
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        self._log(n, cycle)
        if n < self.lr_warm_up_steps[cycle]:
            f = (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        else:
            f = (self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle])
                 * (self.cycle_lengths[cycle] - n) / (self.cycle_lengths[cycle]))
        self.last_f = float(f)
        return self.last_f
