"""LoRA (ldm.modules.lora): key mapping to diffusers, only adapters train, files diffusers'
StableDiffusionPipeline.load_lora_weights reads, merge/unmerge, scale 0 = no LoRA, txt2img --lora."""
from __future__ import annotations

import copy

import pytest
import torch

from ldm.modules import lora as L
from ldm.modules.diffusionmodules.openaimodel import UNetModel

# SD v1's UNet, shrunk (same block layout: 4 levels, 2 res blocks, attention at 3 levels)
UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=2, use_spatial_transformer=True,
            transformer_depth=1, context_dim=32, use_checkpoint=False, legacy=False)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNetModel(**UNET).eval()
    with torch.no_grad():       # zero-initialised output layers re-drawn: every block matters
        for p in unet.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    return unet


def randomize_lora(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in L.lora_parameters(module):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g))


def diffusers_unet(unet):
    """diffusers' UNet2DConditionModel of the same config, weights converted with OUR mapping."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    wrapped = {"model": {"params": {"unet_config": {"params": UNET},
                                    "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    cfg = create_unet_diffusers_config_from_ldm(wrapped, sd)
    cfg["sample_size"] = UNET["image_size"]
    model = UNet2DConditionModel(**cfg).eval()
    model.load_state_dict(L.convert_unet_state_dict(unet), strict=True)
    return model


def test_module_mapping_equals_diffusers_converter():
    """Our path mapping == diffusers' convert_ldm_unet_checkpoint on every key of an SD-v1-shaped UNet."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    unet = tiny_unet()
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    wrapped = {"model": {"params": {"unet_config": {"params": UNET},
                                    "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    ref = convert_ldm_unet_checkpoint(sd, create_unet_diffusers_config_from_ldm(wrapped, sd))
    ours = L.convert_unet_state_dict(unet)
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    print(f"mapping: {len(ours)} keys identical to diffusers' converter")


def test_lora_file_loads_into_diffusers_pipeline(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel
    unet = tiny_unet()
    d_unet = diffusers_unet(unet)
    x, t, ctx = inputs()
    with torch.no_grad():
        base = unet(x, t, context=ctx)
        d_base = d_unet(x, t, encoder_hidden_states=ctx).sample
    print(f"base UNet ours vs diffusers: max abs diff {(base - d_base).abs().max().item():.2e}")
    assert (base - d_base).abs().max().item() < 1e-4

    names = L.inject_lora(unet, L.UNET_TARGETS, rank=4, alpha=8.0)
    assert len(names) == 16 * 2 * 4       # (6 down + 1 mid + 9 up) transformers x (attn1, attn2) x (q, k, v, out)
    randomize_lora(unet)
    with torch.no_grad():
        ours = unet(x, t, context=ctx)
    assert (ours - base).abs().max().item() > 1e-2        # the adapters change the output

    for fmt in ("diffusers", "kohya"):
        path = tmp_path / f"lora_{fmt}.safetensors"
        L.save_lora(unet, str(path), format=fmt)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                    num_attention_heads=2, vocab_size=100, max_position_embeddings=16))
        vae = AutoencoderKL(block_out_channels=[32], down_block_types=["DownEncoderBlock2D"],
                            up_block_types=["UpDecoderBlock2D"], latent_channels=4)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None,
                                       unet=diffusers_unet(tiny_unet()), scheduler=DDIMScheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
        with torch.no_grad():
            theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        diff = (ours - theirs).abs().max().item()
        print(f"LoRA UNet ({fmt} file) ours vs diffusers load_lora_weights: max abs diff {diff:.2e} "
              f"(LoRA effect {(ours - base).abs().max().item():.2e})")
        assert diff < 1e-4

        # the same image: 5 DDIM steps driven by either UNet
        from ldm.diffusion.schedule import make_beta_schedule, schedule_arrays
        from ldm.sampling.ddim import sample_ddim
        from ldm.sampling.schedule_view import make_ddim_timesteps
        ac = schedule_arrays(make_beta_schedule("linear", 1000, 0.00085, 0.012))["alphas_cumprod"]
        grid = make_ddim_timesteps("uniform", 5, 1000, verbose=False)
        x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            a, _ = sample_ddim(lambda z, tt: unet(z, tt, context=ctx), x_T, ac, grid)
            b, _ = sample_ddim(lambda z, tt: pipe.unet(z, tt, encoder_hidden_states=ctx).sample, x_T, ac, grid)
        print(f"5-step DDIM sample ({fmt}): max abs diff {(a - b).abs().max().item():.2e}")
        assert (a - b).abs().max().item() < 1e-3

        # and our loader reads the file back into a fresh UNet
        fresh = tiny_unet()
        assert L.load_lora(fresh, str(path)) == len(names)
        with torch.no_grad():
            assert (fresh(x, t, context=ctx) - ours).abs().max().item() < 1e-5


def test_merge_unmerge_and_scale():
    unet = tiny_unet()
    x, t, ctx = inputs()
    with torch.no_grad():
        base = unet(x, t, context=ctx)
    L.inject_lora(unet, L.UNET_TARGETS, rank=4, alpha=4.0)
    randomize_lora(unet)
    with torch.no_grad():
        unmerged = unet(x, t, context=ctx)
        L.set_lora_scale(unet, 0.0)
        zero = unet(x, t, context=ctx)
        L.set_lora_scale(unet, 0.5)
        half = unet(x, t, context=ctx)
        L.set_lora_scale(unet, 1.0)
        L.merge_lora(unet)
        merged = unet(x, t, context=ctx)
        L.unmerge_lora(unet)
        again = unet(x, t, context=ctx)     # W + BA - BA: equal up to rounding
    print(f"merged vs unmerged: max abs diff {(merged - unmerged).abs().max().item():.2e}; "
          f"unmerge restores: {(again - unmerged).abs().max().item():.2e}; scale 0 vs base: "
          f"{(zero - base).abs().max().item():.2e}")
    assert (merged - unmerged).abs().max().item() < 1e-5
    assert (again - unmerged).abs().max().item() < 1e-5
    assert torch.equal(zero, base)
    assert 0 < (half - base).abs().max().item() < (unmerged - base).abs().max().item()


def test_bad_config_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        L.LoRAConfig.from_spec({"rank": 4, "rnak": 2})
    with pytest.raises(ValueError, match="none of target_modules"):
        L.inject_lora(tiny_unet(), ["no_such_layer"], rank=2, alpha=2)
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        L.load_lora(tiny_unet(), str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file
    save_file({"unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32),
               "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="down_blocks.9.attentions.0.proj_in' is not a layer"):
        L.load_lora(tiny_unet(), str(tmp_path / "x.safetensors"))
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "y.safetensors")
    with pytest.raises(ValueError, match="unrecognised LoRA key 'foo.weight'"):
        L.load_lora(tiny_unet(), str(tmp_path / "y.safetensors"))
