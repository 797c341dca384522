"""LitEma: buffer layout, warm-up schedule, copy_to / store / restore."""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.ema import LitEma


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_buffer_names_dtypes_and_frozen_params():
    model = Wrapper()
    sd = LitEma(model).state_dict()
    assert list(sd) == ["decay", "num_updates", "diffusion_model0weight", "diffusion_model0bias",
                        "diffusion_model1weight", "diffusion_model1bias"]
    assert sd["decay"].dtype == torch.float32 and sd["decay"].shape == ()
    assert sd["num_updates"].dtype == torch.int32 and int(sd["num_updates"]) == 0
    assert int(LitEma(model, use_num_upates=False).state_dict()["num_updates"]) == -1


def test_warmup_schedule_matches_formula():
    torch.manual_seed(0)
    model = Wrapper()
    ema = LitEma(model, decay=0.9999)
    w = model.diffusion_model[0].weight
    shadow = w.detach().clone().double()
    for n in range(1, 6):
        with torch.no_grad():
            w.add_(torch.randn_like(w))
        ema(model)
        decay = min(0.9999, (1 + n) / (10 + n))          # n incremented before use: 2/11, 3/12, ...
        shadow = shadow - (1 - decay) * (shadow - w.detach().double())
        assert int(ema.num_updates) == n
        assert torch.allclose(ema.diffusion_model0weight.double(), shadow, atol=1e-6)


def test_constant_decay_without_num_updates():
    model = Wrapper()
    ema = LitEma(model, decay=0.5, use_num_upates=False)
    start = model.diffusion_model[0].bias.detach().clone()
    with torch.no_grad():
        model.diffusion_model[0].bias.add_(2.0)
    ema(model)
    assert int(ema.num_updates) == -1
    assert torch.allclose(ema.diffusion_model0bias, start + 1.0)


def test_copy_to_store_restore_and_reset():
    model = Wrapper()
    ema = LitEma(model, decay=0.9)
    original = model.diffusion_model[0].weight.detach().clone()
    with torch.no_grad():
        model.diffusion_model[0].weight.add_(1.0)
    ema(model)
    trained = model.diffusion_model[0].weight.detach().clone()
    ema.store(model.parameters())
    ema.copy_to(model)
    assert torch.equal(model.diffusion_model[0].weight, ema.diffusion_model0weight)
    assert not torch.equal(model.diffusion_model[0].weight, trained)
    assert not torch.equal(model.diffusion_model[0].weight, original)
    ema.restore(model.parameters())
    assert torch.equal(model.diffusion_model[0].weight, trained)
    ema.reset_num_updates()
    assert int(ema.num_updates) == 0 and ema.num_updates.dtype == torch.int32
    assert "num_updates" in ema.state_dict()


def test_builds_on_meta_device():
    with torch.device("meta"):
        ema = LitEma(Wrapper())
    assert ema.decay.is_meta and ema.diffusion_model0weight.shape == (4, 3)
