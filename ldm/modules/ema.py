"""Exponential moving average of a model's parameters, kept as buffers (`LitEma`).

State-dict layout is the original's, so released `model_ema.*` entries load strictly:
`decay` (float32 scalar), `num_updates` (int32 scalar, -1 when the warm-up is off) and one
buffer per trainable parameter, named with the dots removed
(`diffusion_model.input_blocks.0.0.weight` -> `diffusion_modelinput_blocks00weight`).

Update (n incremented first): decay_n = min(decay, (1 + n) / (10 + n));
shadow <- shadow - (1 - decay_n) * (shadow - param).

The step makes no host-device synchronisation: the warm-up is computed on the device of the
buffers (`torch.where` instead of a Python `if` on `num_updates`), and all shadows are updated
by `torch._foreach_*` kernels (a few launches instead of three per parameter). The arithmetic
is the original's, element for element, so the result is bit-identical to the per-parameter
loop.

`offload=True` keeps the whole EMA state (shadows, decay, num_updates) in host memory, off the
accelerator: each step copies the parameters into pinned host buffers without blocking and a
worker thread applies the update once the copy has landed (a CUDA event, waited on by the
worker, not by the training loop). Anything that reads the shadows (`copy_to`, `state_dict`,
the next update) first waits for the pending update.
"""
from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterable
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import nn


_WRAPPER_SEGMENTS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


class LitEma(nn.Module):
    """EMA shadow copies of `model`'s trainable parameters."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True,
                 offload: bool = False):
        super().__init__()
        # model: the module whose trainable parameters are averaged
        # decay: EMA decay (the upper bound of the warm-up schedule)
        # use_num_upates (sic, original spelling): warm the decay up as (1 + n) / (10 + n)
        # offload: keep the EMA in (pinned) host memory and update it asynchronously (see module doc)
        if decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")   # '.' is not allowed in buffer names
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []
        # set by sharding strategies (ldm.scaleout): a context giving whole parameters (writeback?)
        self.full_params_context: Optional[Callable[[bool], ContextManager]] = None
        self.offload = False
        self._pending: Optional[threading.Thread] = None
        self._staging: Optional[list[torch.Tensor]] = None
        if offload:
            self.set_offload(True)

    # ------------------------------------------------------------------ offloading
    def set_offload(self, enabled: bool = True) -> "LitEma":
        """Move the EMA state to host memory and keep it there (`.to(device)` / `.cuda()` of a
        parent module then leave it alone), or give it back to the normal device placement."""
        self.wait()
        self.offload = enabled
        self._staging = None
        if enabled:
            for name, buf in self._buffers.items():
                if buf is not None and buf.device.type != "cpu":
                    self._buffers[name] = buf.cpu()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> "LitEma":
        if not self.offload:
            return super()._apply(fn, recurse)
        # dtype conversions still apply; device moves do not (the state stays in host memory).
        # The buffers are taken out first, so the device never holds them even transiently.
        self.wait()
        kept = {k: v for k, v in self._buffers.items() if v is not None}
        for k in kept:
            del self._buffers[k]
        super()._apply(fn, recurse)
        for name, buf in kept.items():
            dtype = fn(torch.empty(0, dtype=buf.dtype)).dtype     # what fn does to the dtype
            self._buffers[name] = buf.to(dtype) if dtype != buf.dtype else buf
        return self

    def wait(self) -> None:
        """Block until an asynchronous (offloaded) update has been applied."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.join()

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self.wait()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.wait()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        self.wait()
        state = self.__dict__.copy()
        state["_pending"], state["_staging"], state["full_params_context"] = None, None, None
        return state

    # ------------------------------------------------------------------ update
    def reset_num_updates(self) -> None:
        """Restart the warm-up (SD v2's `reset_ema`/`reset_num_ema_updates` options)."""
        self.wait()
        device = self.num_updates.device
        del self.num_updates
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int, device=device))

    def _full_params(self, writeback: bool) -> ContextManager:
        return self.full_params_context(writeback) if self.full_params_context else contextlib.nullcontext()

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadows, params) for the trainable parameters of `model`, in the same order
        (wrapper segments FSDP / activation checkpointing insert into names are ignored)."""
        shadows, params = [], []
        for name, p in model.named_parameters():
            name = _WRAPPER_SEGMENTS.sub("", name)
            if p.requires_grad:
                shadows.append(self._buffers[self.m_name2s_name[name]])
                params.append(p)
            else:
                assert name not in self.m_name2s_name, f"{name} was trainable when the EMA was created"
        return shadows, params

    def current_decay(self) -> torch.Tensor:
        """Advance `num_updates` (when counting, i.e. >= 0) and return this step's decay
        (float32), on the buffers' device and without reading either value on the host."""
        n = self.num_updates
        counting = n >= 0
        self.num_updates.copy_(torch.where(counting, n + 1, n))
        warm = (1 + self.num_updates) / (10 + self.num_updates)      # int32 / int32 -> float32
        return torch.where(counting, torch.minimum(self.decay, warm.to(self.decay.dtype)), self.decay)

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current parameters."""
        self.wait()
        with self._full_params(writeback=False):
            shadows, params = self._pairs(model)
            if self.offload and params:
                # (gathered parameters freed on exit: their copies are queued on the stream first)
                self._offloaded_step(shadows, params)
                return
            self._update(shadows, params)

    def _update(self, shadows: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        one_minus_decay = 1.0 - self.current_decay()
        groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for s, p in zip(shadows, params):
            groups.setdefault((s.device, s.dtype), ([], []))
            groups[s.device, s.dtype][0].append(s)
            groups[s.device, s.dtype][1].append(p if (p.device, p.dtype) == (s.device, s.dtype)
                                                else p.to(device=s.device, dtype=s.dtype))
        for (device, dtype), (ss, ps) in groups.items():
            # s <- s - (1 - decay) * (s - p), the original's three operations per element
            diffs = torch._foreach_sub(ss, ps)
            torch._foreach_mul_(diffs, one_minus_decay.to(device=device, dtype=dtype))
            torch._foreach_sub_(ss, diffs)

    def _offloaded_step(self, shadows: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        """Copy params to pinned host buffers without blocking; update in a worker thread."""
        if self._staging is None or len(self._staging) != len(params):
            pin = torch.cuda.is_available() and any(p.is_cuda for p in params)
            self._staging = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin) for p in params]
        staging = self._staging
        for dst, src in zip(staging, params):
            dst.copy_(src.detach(), non_blocking=True)
        event = None
        if any(p.is_cuda for p in params):
            event = torch.cuda.Event()
            event.record()

        def work() -> None:
            if event is not None:
                event.synchronize()          # this thread waits for the copies; training does not
            self._update(shadows, staging)
        self._pending = threading.Thread(target=work, name="LitEma-offload", daemon=True)
        self._pending.start()

    # ------------------------------------------------------------------ using the average
    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged values into `model`'s parameters."""
        self.wait()
        with self._full_params(writeback=True):
            shadows, params = self._pairs(model)
            for s, p in zip(shadows, params):
                p.copy_(s)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Save copies of `parameters` (before `copy_to`) for `restore`."""
        self.collected_params = [param.detach().clone() for param in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the values saved by `store` (validate with EMA weights, then continue training)."""
        for c_param, param in zip(self.collected_params, parameters):
            param.copy_(c_param)
        self.collected_params = []
