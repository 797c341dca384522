"""LitEma's foreach update: bit-identical to the original per-parameter loop, no host reads of
device values, and the host-offloaded variant (state in host memory, asynchronous update)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.modules.ema import LitEma

torch.set_num_threads(1)


def net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    m[1].requires_grad_(False)          # frozen parameters get no shadow
    return m


class OriginalLitEma:
    """The original update, written out: Python `min` on tensors and one sub_ per parameter."""

    def __init__(self, model: nn.Module, decay: float, use_num_upates: bool):
        self.decay = torch.tensor(decay, dtype=torch.float32)
        self.num_updates = torch.tensor(0 if use_num_upates else -1, dtype=torch.int)
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def __call__(self, model: nn.Module) -> None:
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    self.shadow[n].sub_(one_minus_decay * (self.shadow[n] - p))


def perturb(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("use_num_upates", [True, False])
@pytest.mark.parametrize("offload", [False, True])
def test_bit_identical_to_the_original_over_100_steps(use_num_upates, offload):
    model = net()
    ema = LitEma(model, decay=0.999, use_num_upates=use_num_upates, offload=offload)
    ref = OriginalLitEma(model, 0.999, use_num_upates)
    for step in range(100):
        perturb(model, step)
        ema(model)
        ref(model)
    sd = ema.state_dict()
    assert torch.equal(sd["num_updates"], ref.num_updates)
    for name, s in ref.shadow.items():
        assert torch.equal(sd[name.replace(".", "")], s), name      # bit for bit


class Reads(TorchDispatchMode):
    """Ops that read a tensor's value on the host (`.item()`, `bool(t)`, `if t >= 0:`)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += "_local_scalar_dense" in func.__name__ or "nonzero" in func.__name__
        return func(*args, **(kwargs or {}))


def test_update_reads_nothing_on_the_host():
    model = net()
    ema = LitEma(model)
    with Reads() as reads:
        for _ in range(3):
            ema(model)
    assert reads.n == 0 and int(ema.num_updates) == 3


def test_update_on_the_meta_device():
    # a device read on meta raises; the update and warm-up must run there unchanged
    model = net().to("meta")
    ema = LitEma(net()).to("meta")
    ema(model)
    assert ema.num_updates.device.type == "meta"


def test_offloaded_state_stays_in_host_memory_and_keeps_its_names():
    model = net()
    plain, off = LitEma(model), LitEma(model, offload=True)
    parent = nn.Module()
    parent.model_ema = off
    parent.to("meta")                                    # a device move of the parent module...
    assert all(b.device.type == "cpu" for b in off.buffers())   # ...leaves the EMA in host memory
    assert list(off.state_dict()) == list(plain.state_dict())
    parent.double()                                      # dtype conversions still apply
    assert off.get_buffer("0weight").dtype == torch.float64 and off.get_buffer("0weight").device.type == "cpu"


def test_offloaded_update_is_waited_for_by_readers():
    model = net()
    ema = LitEma(model, decay=0.5, use_num_upates=False, offload=True)
    target = copy.deepcopy(model)
    perturb(model, 0)
    ema(model)                      # asynchronous
    ema.copy_to(target)             # waits
    expected = 0.5 * (net()[0].weight + model[0].weight)
    assert torch.allclose(target[0].weight, expected)
    assert copy.deepcopy(ema).offload          # picklable / copyable with an update in flight
