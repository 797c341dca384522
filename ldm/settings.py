"""Run-wide switches: the one place that reads the environment.

The library takes these as explicit values (`settings.current()` inside a `settings.override(...)`
block, or arguments); only this module looks at `os.environ`, so that users and external tools
keep their documented switches:

    LDM_RANDOM_HUB_WEIGHTS=1   build CLIP / OpenCLIP encoders with random weights (a full checkpoint
                               holding theirs is loaded next)            -> Settings.random_hub_weights
    LDM_LPIPS_RANDOM=1         LPIPS with random weights (tests only)     -> Settings.lpips_random

Code that wants a switch for a block of work (the sampling scripts loading a full checkpoint)
uses `with settings.override(random_hub_weights=True):` -- a context variable, not a
process-wide environment change.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

RANDOM_HUB_WEIGHTS_ENV = "LDM_RANDOM_HUB_WEIGHTS"
LPIPS_RANDOM_ENV = "LDM_LPIPS_RANDOM"
_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class Settings:
    random_hub_weights: bool = False   # hub text encoders built without their pretrained files
    lpips_random: bool = False         # LPIPS built with random weights

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        env = os.environ if environ is None else environ
        flag = lambda name: env.get(name, "").strip().lower() in _TRUE   # noqa: E731
        return cls(random_hub_weights=flag(RANDOM_HUB_WEIGHTS_ENV), lpips_random=flag(LPIPS_RANDOM_ENV))


_override: contextvars.ContextVar[Optional[Settings]] = contextvars.ContextVar("ldm_settings", default=None)


def current() -> Settings:
    """The settings in force: those of the innermost `override` block, else the environment's."""
    s = _override.get()
    return s if s is not None else Settings.from_env()


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """Within the block, `current()` has `changes` applied (on top of the settings in force)."""
    new = dataclasses.replace(current(), **changes)
    token = _override.set(new)
    try:
        yield new
    finally:
        _override.reset(token)
