"""Exponential moving average of a model's parameters, kept as buffers (`LitEma`).

State-dict layout is the original's, so released `model_ema.*` entries load strictly:
`decay` (float32 scalar), `num_updates` (int32 scalar, -1 when the warm-up is off) and one
buffer per trainable parameter, named with the dots removed
(`diffusion_model.input_blocks.0.0.weight` -> `diffusion_modelinput_blocks00weight`).

Update (n incremented first): decay_n = min(decay, (1 + n) / (10 + n));
shadow <- shadow - (1 - decay_n) * (shadow - param).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA shadow copies of `model`'s trainable parameters."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        # model: the module whose trainable parameters are averaged
        # decay: EMA decay (the upper bound of the warm-up schedule)
        # use_num_upates (sic, original spelling): warm the decay up as (1 + n) / (10 + n)
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

    def reset_num_updates(self) -> None:
        """Restart the warm-up (SD v2's `reset_ema`/`reset_num_ema_updates` options)."""
        del self.num_updates
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int))

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadows, params) for the trainable parameters of `model`, in the same order."""
        shadows, params = [], []
        buffers = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                shadows.append(buffers[self.m_name2s_name[name]])
                params.append(p)
            else:
                assert name not in self.m_name2s_name, f"{name} was trainable when the EMA was created"
        return shadows, params

    def current_decay(self) -> torch.Tensor:
        """Advance `num_updates` (when counting) and return this step's decay (float32)."""
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            warm = (1 + self.num_updates) / (10 + self.num_updates)   # int32 / int32 -> float32
            decay = torch.minimum(decay, warm.to(decay.dtype))
        return decay

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current parameters."""
        one_minus_decay = 1.0 - self.current_decay()
        shadows, params = self._pairs(model)
        for s, p in zip(shadows, params):
            s.sub_(one_minus_decay.to(s.dtype) * (s - p.to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged values into `model`'s parameters."""
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
