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


# SD v2's: linear proj_in/proj_out, heads of fixed width
UNET_V2 = {**UNET, "num_heads": -1, "num_head_channels": 16, "use_linear_in_transformer": True}


def tiny_unet(seed=0, params=UNET):
    torch.manual_seed(seed)
    unet = UNetModel(**params).eval()
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


def diffusers_unet(unet, params=UNET):
    """diffusers' UNet2DConditionModel of the same config, weights converted with OUR mapping."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    wrapped = {"model": {"params": {"unet_config": {"params": params},
                                    "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    cfg = create_unet_diffusers_config_from_ldm(wrapped, sd)
    cfg["sample_size"] = params["image_size"]
    model = UNet2DConditionModel(**cfg).eval()
    model.load_state_dict(L.convert_unet_state_dict(unet), strict=True)
    return model


def tiny_pipeline(unet, text_encoder):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    vae = AutoencoderKL(block_out_channels=[32], down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], latent_channels=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.mark.parametrize("params", [UNET, UNET_V2], ids=["sd1", "sd2"])
def test_module_mapping_equals_diffusers_converter(params):
    """Our path mapping == diffusers' convert_ldm_unet_checkpoint on every key of an SD-shaped UNet."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    unet = tiny_unet(params=params)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    wrapped = {"model": {"params": {"unet_config": {"params": params},
                                    "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    ref = convert_ldm_unet_checkpoint(sd, create_unet_diffusers_config_from_ldm(wrapped, sd))
    ours = L.convert_unet_state_dict(unet)
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    print(f"mapping: {len(ours)} keys identical to diffusers' converter")


def test_lora_file_loads_into_diffusers_pipeline(tmp_path):
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
        pipe = tiny_pipeline(diffusers_unet(tiny_unet()), text_encoder)
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


# ----------------------------------------------------------------------------------------
# LatentDiffusion with lora_config (tiny SD v1), saving beside checkpoints, txt2img --lora
# ----------------------------------------------------------------------------------------
SD1 = "configs/stable-diffusion/v1-inference.yaml"


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    from conftest import ROOT
    from test_scripts_common import script
    out = tmp_path_factory.mktemp("lora_sd1")
    script("make_tiny_checkpoint").main([str(ROOT / SD1), "--tiny", "--out", str(out / "model.ckpt")])
    return out / "config.yaml", out / "model.ckpt"


def build_lora_model(tiny_sd1, lora=None, **kw):
    from omegaconf import OmegaConf

    from ldm import scripting as S
    from ldm.util import instantiate_from_config
    cfg_path, ckpt = tiny_sd1
    cfg = OmegaConf.load(cfg_path)
    cfg.model.params.ckpt_path = str(ckpt)                  # the base weights, loaded before LoRA is added
    if lora is not None or kw:
        cfg.model.params.lora_config = {**(lora or {}), **kw}
    with S.random_hub_weights():
        return instantiate_from_config(cfg.model)


def _batch(model, n=2):
    from ldm import scripting as S
    size = S.image_size(model) * S.downsampling_factor(model)[0]
    g = torch.Generator().manual_seed(0)
    return {model.first_stage_key: torch.rand(n, size, size, 3, generator=g) * 2 - 1, "txt": ["a red cube", "a cat"][:n]}


def test_only_adapters_train(tiny_sd1, tmp_path):
    model = build_lora_model(tiny_sd1, rank=4, alpha=8, dropout=0.1)
    layers = L._lora_layers(model.model.diffusion_model)
    expected = sum(4 * (m.in_features + m.out_features) for m in layers.values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    print(f"LoRA layers {len(layers)}, trainable parameters {n_trainable} of {n_total} (expected {expected})")
    assert n_trainable == expected and len(model.trainable_parameters()) == len(trainable) == 2 * len(layers)
    model.learning_rate = 1e-3
    model.use_scheduler = False          # (the config's warm-up starts at lr ~ 0)
    opt = model.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple) else opt
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for _ in range(2):
        loss, _ = model.shared_step(_batch(model))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    print(f"after 2 steps: {len(changed)} tensors changed, all LoRA: {all('lora_' in k for k in changed)}")
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    assert len(changed) == 2 * len(layers)

    # on_save_checkpoint writes lora.safetensors into the checkpoint folder; it loads back
    from types import SimpleNamespace
    model._trainer = SimpleNamespace(global_rank=0, checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)),
                                     default_root_dir=str(tmp_path))
    model.on_save_checkpoint({})
    model._trainer = None
    path = tmp_path / "lora.safetensors"
    assert path.is_file()
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert "lora_config" in f.metadata()
    assert len(keys) == 2 * len(layers) and all(k.startswith("unet.") for k in keys)
    base = build_lora_model(tiny_sd1, None).eval()             # the base model, no lora_config
    assert L.load_lora(base, str(path)) == len(layers)
    model.eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, ctx = torch.tensor([3, 900]), torch.randn(2, 77, model.model.diffusion_model.context_dim
                                                  if hasattr(model.model.diffusion_model, "context_dim") else 64)
    with torch.no_grad():
        d = (base.model.diffusion_model(x, t, context=ctx) - model.model.diffusion_model(x, t, context=ctx)).abs().max()
    print(f"saved lora.safetensors reloaded into the base model: max abs diff {d.item():.2e}")
    assert d.item() < 1e-5


def test_lora_model_sampling_merged_equals_unmerged(tiny_sd1):
    from ldm.sampling.ddim import sample_ddim
    from ldm.sampling.schedule_view import make_ddim_timesteps
    model = build_lora_model(tiny_sd1, rank=4).eval()
    randomize_lora(model.model.diffusion_model)
    with torch.no_grad():
        c = model.get_learned_conditioning(["a red cube", "a cat"])
        x_T = torch.randn(2, model.channels, model.image_size, model.image_size, generator=torch.Generator().manual_seed(3))
        grid = make_ddim_timesteps("uniform", 5, model.num_timesteps, verbose=False)
        run = lambda: sample_ddim(lambda z, t: model.apply_model(z, t, c), x_T, model.alphas_cumprod, grid)[0]  # noqa: E731
        L.set_lora_scale(model, 0.0)
        base = run()
        L.set_lora_scale(model, 1.0)
        unmerged = run()
        L.merge_lora(model)
        merged = run()
    diff = (merged - unmerged).abs().max().item()
    effect = (unmerged - base).abs().max().item()
    scale = unmerged.abs().max().item()
    print(f"5-step DDIM latents, merged vs unmerged: max abs diff {diff:.2e} (max |z| {scale:.1f}; "
          f"LoRA effect {effect:.2e})")
    # float32 rounding of W + BA, amplified over the steps by the random tiny model
    assert diff < 2e-3 * scale and diff < 0.01 * effect


def test_text_encoder_lora_loads_into_diffusers(tiny_sd1, tmp_path):
    from omegaconf import OmegaConf
    base = build_lora_model(tiny_sd1, None).eval()
    te_base = copy.deepcopy(base.cond_stage_model.transformer)
    unet_params = OmegaConf.to_container(OmegaConf.load(tiny_sd1[0]).model.params.unet_config.params)
    pipe = tiny_pipeline(diffusers_unet(base.model.diffusion_model, unet_params), te_base)
    model = build_lora_model(tiny_sd1, rank=2, alpha=4, text_encoder=True).eval()
    assert model.cond_stage_trainable           # the conditioning is then encoded inside the training step
    te_layers = L._lora_layers(model.cond_stage_model.transformer)
    assert len(te_layers) == 4 * model.cond_stage_model.transformer.config.num_hidden_layers
    randomize_lora(model)
    path = tmp_path / "te.safetensors"
    L.save_lora(model, str(path))
    ids = torch.randint(0, te_base.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain_te = te_base(input_ids=ids).last_hidden_state
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)      # (into te_base, the pipeline's encoder)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 600])
    with torch.no_grad():
        ours_te = model.cond_stage_model.transformer(input_ids=ids).last_hidden_state
        theirs_te = pipe.text_encoder(input_ids=ids).last_hidden_state
        ctx = ours_te
        ours = model.model.diffusion_model(x, t, context=ctx)
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        effect = (ours_te - plain_te).abs().max().item()
    d_te, d_unet = (ours_te - theirs_te).abs().max().item(), (ours - theirs).abs().max().item()
    assert effect > 1e-2
    print(f"text encoder + UNet LoRA vs diffusers: text encoder max abs diff {d_te:.2e} (LoRA effect {effect:.2e}), "
          f"UNet {d_unet:.2e}")
    assert d_te < 1e-4 and d_unet < 1e-4


def test_txt2img_lora_and_scale(tiny_sd1, tmp_path):
    from test_scripts_common import png_bytes, script
    cfg, ckpt = tiny_sd1
    model = build_lora_model(tiny_sd1, rank=4)
    randomize_lora(model)
    L.save_lora(model, str(tmp_path / "style.safetensors"))

    def run(name, *extra):
        return script("txt2img").main(["--config", str(cfg), "--ckpt", str(ckpt), "--outdir", str(tmp_path / name),
                                       "--H", "64", "--W", "64", "--steps", "3", "--n_samples", "1", "--seed", "1",
                                       "--device", "cpu", *extra])
    base = run("base")
    zero = run("zero", "--lora", str(tmp_path / "style.safetensors"), "--lora-scale", "0")
    styled = run("styled", "--lora", str(tmp_path / "style.safetensors"), "--lora-scale", "0.8")
    assert png_bytes(zero) == png_bytes(base)          # scale 0: exactly the base model
    assert png_bytes(styled) != png_bytes(base)
    with pytest.raises(SystemExit):
        run("missing", "--lora", str(tmp_path / "nope.safetensors"))
