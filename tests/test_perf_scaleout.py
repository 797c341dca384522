"""Scale-out presets (configs/scale/*.yaml), the FSDP strategy they build, and regional
compilation of the UNet's repeated blocks (compiling itself only with LDM_TEST_COMPILE=1)."""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from conftest import ROOT
from ldm import perf, scaleout
from ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
from ldm.modules.attention import SpatialTransformer
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config

torch.set_num_threads(1)
PRESETS = sorted((ROOT / "configs" / "scale").glob("*.yaml"))
UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
            num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, context_dim=16)


def test_every_preset_merges_onto_its_base_config():
    assert {p.stem for p in PRESETS} == {"ddp-small", "fsdp-sd", "fsdp-large"}
    for preset in PRESETS:
        cfg = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "ldm" / "celebahq.yaml"), OmegaConf.load(preset))
        unet = cfg.model.params.unet_config
        assert unet.target.endswith("UNetModel") and "model_channels" in unet.params    # merged, not replaced
        assert cfg.model.params.compile_unet == {"regional": True}
        assert cfg.lightning.trainer.precision == "bf16-mixed"
        for cb in cfg.lightning.callbacks.values():
            assert instantiate_from_config(cb) is not None


@pytest.mark.parametrize("preset, sharding", [("fsdp-sd", "SHARD_GRAD_OP"), ("fsdp-large", "FULL_SHARD")])
def test_fsdp_presets_build_the_strategy(preset, sharding):
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    cfg = OmegaConf.load(ROOT / "configs" / "scale" / f"{preset}.yaml")
    strategy = instantiate_from_config(cfg.lightning.trainer.strategy)
    assert isinstance(strategy, scaleout.LDMFSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy[sharding]
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert {c.__name__ for c in policy._module_classes} == {"ResBlock", "SpatialTransformer", "AttentionBlock"}
    ckpt = strategy._activation_checkpointing_kwargs
    assert ckpt and {c.__name__ for c in ckpt["auto_wrap_policy"]._module_classes} == set(scaleout.BLOCK_NAMES)


def test_frozen_stages_are_replicated_trainable_ones_sharded():
    class LDM(torch.nn.Module):
        def __init__(self, trainable_cond: bool):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)
            self.first_stage_model = torch.nn.Linear(2, 2).requires_grad_(False)
            self.cond_stage_model = torch.nn.Linear(2, 2).requires_grad_(trainable_cond)
    frozen, trainable = LDM(False), LDM(True)
    assert scaleout.replicated_modules(frozen) == [frozen.first_stage_model, frozen.cond_stage_model]
    assert scaleout.replicated_modules(trainable) == [trainable.first_stage_model]


def test_ema_follows_wrapped_parameter_names():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    ema = LitEma(model, decay=0.5, use_num_upates=False)
    model[1] = checkpoint_wrapper(model[1])            # names gain "_checkpoint_wrapped_module."
    with torch.no_grad():
        model[1]._checkpoint_wrapped_module.weight.add_(2.0)
    before = ema.get_buffer("1weight").clone()
    ema(model)
    assert torch.allclose(ema.get_buffer("1weight"), before + 1.0)


def test_memory_estimate():
    n = 860_000_000
    ddp = scaleout.memory_per_rank_gib(n, 8, "NO_SHARD")
    zero2 = scaleout.memory_per_rank_gib(n, 8, "SHARD_GRAD_OP", ema_offload=True)
    assert ddp == pytest.approx(20 * n / 2 ** 30) and zero2 == pytest.approx((4 + 12 / 8) * n / 2 ** 30)


def test_regional_compile_wraps_the_repeated_blocks():
    unet = UNetModel(**UNET)
    keys = list(unet.state_dict())
    names = perf.compile_repeated_blocks(unet)
    blocks = {n for n, m in unet.named_modules() if isinstance(m, (ResBlock, SpatialTransformer))}
    assert set(names) == blocks and len(names) == 15         # 8 ResBlocks, 7 SpatialTransformers
    assert all(perf.is_compiled(unet.get_submodule(n)) for n in names)
    assert not perf.is_compiled(unet) and not perf.is_compiled(unet.input_blocks[0])
    assert list(unet.state_dict()) == keys                   # no _orig_mod. prefixes
    assert not any(perf.is_compiled(m) for m in unet.get_submodule(names[-1]).modules()
                   if m is not unet.get_submodule(names[-1]))     # outermost blocks only
    unet2 = UNetModel(**UNET)
    perf.compile_module(unet2, {"regional": True})
    assert not perf.is_compiled(unet2) and perf.is_compiled(unet2.middle_block[0])


def test_regional_compile_parity():
    if os.environ.get("LDM_TEST_COMPILE") != "1":
        pytest.skip("numeric torch.compile parity: set LDM_TEST_COMPILE=1 (compiling takes minutes on CPU)")
    torch.manual_seed(0)
    plain = UNetModel(**UNET)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.1)
    fast = UNetModel(**UNET)
    fast.load_state_dict(plain.state_dict())
    perf.compile_repeated_blocks(fast)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref, got = plain(x, t, context=c), fast(x, t, context=c)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
