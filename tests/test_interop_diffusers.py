"""ours -> diffusers -> ours for tiny SD v1, SD v2-v, celeba256-style (unconditional, legacy
attention), cin256-style (class-conditional, num_head_channels) and VQ models: diffusers loads
the folder offline, its UNet / VAE / 5-step DDIM pipeline match ours, and importing the folder
back gives a bit-identical state dict."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

diffusers = pytest.importorskip("diffusers")   # a declared test dependency

from ldm.interop import InteropError, export_diffusers, import_diffusers  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402

CASES = {
    "sd1": ("configs/stable-diffusion/v1-inference.yaml", []),
    "sd2v": ("configs/stable-diffusion/v2-inference-v.yaml", []),
    "celeba": ("configs/ldm/celebahq.yaml", []),
    "cin": ("configs/ldm/cin256.yaml", ["model.params.unet_config.params.num_heads=-1",
                                        "model.params.unet_config.params.num_head_channels=16"]),
}
# 16x16 latents for the 4-level pixel-space-attention models: at 1x1 the GroupNorms of a tiny
# random UNet divide by sqrt(eps) and amplify float rounding 300-fold
SIDE16 = ["model.params.image_size=16", "model.params.unet_config.params.image_size=16"]
CASES["celeba"][1].extend(SIDE16)
CASES["cin"][1].extend(SIDE16)
TOL = 2e-4   # float32 reordering (SDPA vs. the diffusers attention processor, split qkv)


def _build(name, tmp):
    from make_tiny_checkpoint import make_tiny
    from ldm import scripting as S
    cfg, sets = CASES[name]
    ckpt = tmp / f"{name}.safetensors"
    cfg_out = make_tiny(ROOT / cfg, [ckpt], overrides=sets, config_out=tmp / f"{name}.yaml")
    return S.load_config(cfg_out), S.load_model(cfg_out, ckpt)


def _report(name, what, diff):
    print(f"INTEROP {name:7s} {what:26s} max|diff| = {diff:.3g}")


def _assert_same_state_dict(a, b):
    # a diffusers folder holds one set of weights: the EMA shadows (when the config has them) stay behind
    a = {k: v for k, v in a.items() if not k.startswith("model_ema.")}
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for name in CASES:
        tmp = tmp_path_factory.mktemp(name)
        cfg, model = _build(name, tmp)
        torch.manual_seed(0)
        out[name] = (cfg, model, export_diffusers(model, cfg, tmp / "diffusers"), tmp)
    return out


def _ours_ddim(model, shape, x_T, cond, uc=None, scale=1.0):
    s = DDIMSampler(model)
    z, _ = s.sample(S=5, batch_size=x_T.shape[0], shape=shape, conditioning=cond, eta=0.0, x_T=x_T.clone(),
                    verbose=False, unconditional_guidance_scale=scale, unconditional_conditioning=uc)
    return torch.clamp((model.decode_first_stage(z) + 1) / 2, 0, 1)


@torch.no_grad()
def test_sd_v1_and_v2v_pipelines_match(exported):
    from diffusers import StableDiffusionPipeline
    for name in ("sd1", "sd2v"):
        cfg, model, root, tmp = exported[name]
        index = json.loads((root / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionPipeline"
        pipe = StableDiffusionPipeline.from_pretrained(root, local_files_only=True)
        sched = pipe.scheduler.config
        assert sched.prediction_type == ("v_prediction" if name == "sd2v" else "epsilon")
        assert sched.steps_offset == 1 and sched.beta_schedule == "scaled_linear"
        assert pipe.vae.config.scaling_factor == pytest.approx(float(model.scale_factor))
        prompts = ["a red cube on a table", "two dogs"]
        c = model.get_learned_conditioning(prompts)
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        assert torch.equal(ids, model.cond_stage_model.tokenize(prompts))
        te = pipe.text_encoder(ids)[0]
        _report(name, "text encoder", (te - c).abs().max().item())
        assert (te - c).abs().max() < TOL
        C, H = model.channels, model.image_size
        x = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([3, 700])
        a = model.apply_model(x, t, c)
        b = pipe.unet(x, t, encoder_hidden_states=c).sample
        _report(name, "unet", (a - b).abs().max().item())
        assert a.abs().max() > 1e-2 and (a - b).abs().max() < TOL
        img = torch.rand(2, 3, 8 * H // 8 * 8, 8 * H // 8 * 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
        za = model.first_stage_model.encode(img).mode()
        zb = pipe.vae.encode(img).latent_dist.mode()
        ra, rb = model.first_stage_model.decode(za), pipe.vae.decode(za).sample
        _report(name, "vae encode / decode", max((za - zb).abs().max().item(), (ra - rb).abs().max().item()))
        assert (za - zb).abs().max() < TOL and (ra - rb).abs().max() < TOL
        uc = model.get_learned_conditioning([""] * 2)
        ours = _ours_ddim(model, (C, H, H), x, c, uc, scale=3.0)
        theirs = pipe(prompts, num_inference_steps=5, guidance_scale=3.0, latents=x.clone(), eta=0.0,
                      output_type="pt").images
        _report(name, "5-step DDIM image (cfg 3)", (ours - theirs).abs().max().item())
        assert ours.std() > 1e-3 and (ours - theirs).abs().max() < 1e-3


@torch.no_grad()
def test_unconditional_and_class_conditional_pipelines_match(exported):
    from diffusers import LDMPipeline

    from ldm.interop import LDMClassConditionalPipeline
    cfg, model, root, _ = exported["celeba"]
    pipe = LDMPipeline.from_pretrained(root, local_files_only=True)
    assert type(pipe.unet).__name__ == "UNet2DModel" and type(pipe.vqvae).__name__ == "VQModel"
    C, H = model.channels, model.image_size
    x = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([5, 999])
    a, b = model.apply_model(x, t, None), pipe.unet(x, t).sample
    _report("celeba", "unet (UNet2DModel)", (a - b).abs().max().item())
    assert a.abs().max() > 1e-2 and (a - b).abs().max() < TOL
    ra, rb = model.decode_first_stage(x), pipe.vqvae.decode(x / pipe.vqvae.config.scaling_factor).sample
    _report("celeba", "vq decode (quantised)", (ra - rb).abs().max().item())
    assert (ra - rb).abs().max() < TOL
    ours = _ours_ddim(model, (C, H, H), torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(4)), None)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=5, eta=0.0,
                  output_type="np").images
    diff = (ours.permute(0, 2, 3, 1).numpy() - theirs).__abs__().max()
    _report("celeba", "5-step DDIM image", float(diff))
    assert diff < 5e-3   # float rounding through 5 steps, then the VQ codebook lookup of the decoder

    cfg, model, root, _ = exported["cin"]
    pipe = LDMClassConditionalPipeline.from_pretrained(root, local_files_only=True)
    labels = torch.tensor([3, 7])
    c = model.get_learned_conditioning({model.cond_stage_key: labels})
    C, H = model.channels, model.image_size
    x = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(5))
    a = model.apply_model(x, torch.tensor([10, 400]), c)
    b = pipe.unet(x, torch.tensor([10, 400]), encoder_hidden_states=pipe.class_embedder(labels)).sample
    _report("cin", "unet (cross-attn, classes)", (a - b).abs().max().item())
    assert a.abs().max() > 1e-2 and (a - b).abs().max() < TOL
    z, _ = DDIMSampler(model).sample(S=5, batch_size=2, shape=(C, H, H), conditioning=c, eta=0.0, x_T=x.clone(),
                                     verbose=False)
    z_theirs = pipe(class_labels=[3, 7], latents=x.clone(), num_inference_steps=5, output_type="latent").images
    _report("cin", "5-step DDIM latent", (z - z_theirs / model.scale_factor * model.scale_factor).abs().max().item())
    assert (z - z_theirs).abs().max() < 1e-4
    ours = torch.clamp((model.decode_first_stage(z) + 1) / 2, 0, 1)
    theirs = pipe(class_labels=[3, 7], latents=x.clone(), num_inference_steps=5, output_type="pt").images
    _report("cin", "5-step DDIM image", (ours - theirs).abs().max().item())
    assert (ours - theirs).abs().max() < 1e-2   # + the VQ codebook lookup: near-ties may pick another code


def test_import_back_is_bit_identical(exported, tmp_path):
    import convert
    for name, (cfg, model, root, tmp) in exported.items():
        config, sd = import_diffusers(root, text_dir=tmp_path / f"{name}_text")   # derived, not the stored config
        _assert_same_state_dict(model.state_dict(), sd)
        assert config["model"]["params"]["unet_config"]["params"]["model_channels"] == 32
    # the CLI: folder -> YAML + safetensors that load strictly through the checkpoint boundary
    cfg_out, ckpt_out = convert.main(["from-diffusers", "--dir", str(exported["sd1"][2]),
                                      "--config", str(tmp_path / "sd1.yaml"), "--ckpt", str(tmp_path / "sd1.safetensors")])
    from ldm import scripting as S
    again = S.load_model(cfg_out, ckpt_out)
    _assert_same_state_dict(exported["sd1"][1].state_dict(), again.state_dict())


@torch.no_grad()
def test_vq_autoencoder_round_trip(tmp_path):
    import convert
    from diffusers import VQModel
    from make_tiny_checkpoint import make_tiny
    from ldm import scripting as S
    ckpt = tmp_path / "vq.ckpt"
    cfg = make_tiny(ROOT / "configs/autoencoder/vq-f8.yaml", [ckpt], config_out=tmp_path / "vq.yaml")
    out = convert.main(["to-diffusers", "--config", str(cfg), "--ckpt", str(ckpt), "--out", str(tmp_path / "d")])
    vq = VQModel.from_pretrained(out, local_files_only=True)
    ours = S.load_model(cfg, ckpt)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ha, hb = ours.encode(x)[0], vq.quantize(vq.encode(x).latents)[0]
    ra, rb = ours.decode(ha), vq.decode(vq.encode(x).latents).sample
    _report("vq-f8", "quantised latents / recon", max((ha - hb).abs().max().item(), (ra - rb).abs().max().item()))
    assert (ha - hb).abs().max() < TOL and (ra - rb).abs().max() < TOL
    cfg2, ck2 = convert.main(["from-diffusers", "--dir", str(out), "--config", str(tmp_path / "vq2.yaml"),
                              "--ckpt", str(tmp_path / "vq2.safetensors")])
    _assert_same_state_dict(ours.state_dict(), S.load_model(cfg2, ck2).state_dict())


def test_inexpressible_unet_says_why():
    from ldm.interop.unet import diffusers_unet_config
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    # lsun_churches-style: num_heads 8 over widths 32/64 -> per-block head widths differ
    u = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                  num_res_blocks=1, channel_mult=[1, 2], num_heads=8)
    with pytest.raises(InteropError, match="attention_head_dim"):
        diffusers_unet_config(u)
    u = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
                  num_res_blocks=2, channel_mult=[1, 2], num_head_channels=16, num_attention_blocks=[1, 0])
    with pytest.raises(InteropError, match="only some of its blocks"):
        diffusers_unet_config(u)


@torch.no_grad()
def test_sd2_openclip_text_encoder_round_trip(tmp_path):
    """SD 2's OpenCLIP text tower ("penultimate") -> a CLIPTextModel with one layer less, the unused
    weights kept in ldm_extra.safetensors; same embeddings, bit-identical import."""
    import open_clip
    from diffusers import StableDiffusionPipeline
    from make_tiny_checkpoint import make_tiny
    from omegaconf import OmegaConf

    from ldm import scripting as S
    arch = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16,
                                            "patch_size": 56},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3}}
    (tmp_path / "ldm-interop-tiny.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "ldm-interop-tiny.json")
    ckpt = tmp_path / "sd2.safetensors"
    cfg_path = make_tiny(ROOT / CASES["sd2v"][0], [ckpt], config_out=tmp_path / "sd2.yaml",
                         overrides=["model.params.cond_stage_config.target="
                                    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                    "model.params.cond_stage_config.params={arch: ldm-interop-tiny, layer: penultimate,"
                                    " pretrained: false}"])
    model = S.load_model(cfg_path, ckpt)
    root = export_diffusers(model, S.load_config(cfg_path), tmp_path / "d")
    pipe = StableDiffusionPipeline.from_pretrained(root, local_files_only=True)
    assert pipe.text_encoder.config.num_hidden_layers == 2
    prompts = ["a small house", "snow"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, open_clip.tokenize(prompts))
    c = model.get_learned_conditioning(prompts)
    diff = (pipe.text_encoder(ids)[0] - c).abs().max().item()
    _report("sd2-oc", "OpenCLIP text encoder", diff)
    assert diff < TOL
    config, sd = import_diffusers(root)
    assert config["model"]["params"]["cond_stage_config"]["target"].endswith("FrozenOpenCLIPEmbedder")
    _assert_same_state_dict(model.state_dict(), sd)
    assert OmegaConf.create(config).model.params.cond_stage_config.params.layer == "penultimate"


ZOO_UNETS = {
    # lsun_churches-style blocks (scale-shift norm, resblock up/down) with num_head_channels and labels
    "scale_shift_updown_classes": dict(in_channels=3, out_channels=3, attention_resolutions=[2, 4], channel_mult=[1, 2, 2],
                                       num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
                                       num_classes=10),
    "new_attention_order": dict(in_channels=3, out_channels=3, attention_resolutions=[2], channel_mult=[1, 2],
                                num_head_channels=16, use_new_attention_order=True),
    "per_level_res_blocks_linear": dict(in_channels=4, out_channels=4, attention_resolutions=[4, 2, 1],
                                        num_res_blocks=[1, 2, 1, 1], channel_mult=[1, 2, 2, 2], num_head_channels=16,
                                        use_spatial_transformer=True, use_linear_in_transformer=True, context_dim=24,
                                        legacy=False, transformer_depth=2),
}


@pytest.mark.parametrize("name", sorted(ZOO_UNETS))
@torch.no_grad()
def test_zoo_unet_variants_match_and_round_trip(name):
    from ldm.interop.keymap import to_ours, to_theirs
    from ldm.interop.unet import diffusers_unet_config, unet_params_from_diffusers, unet_rules
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    p = {"image_size": 16, "model_channels": 32, "num_res_blocks": 1, **ZOO_UNETS[name]}
    torch.manual_seed(0)
    ours = UNetModel(**p).eval()
    for w in ours.parameters():
        w.copy_(torch.randn_like(w) * 0.1)
    kind, cfg = diffusers_unet_config(ours)
    theirs = getattr(diffusers, kind)(**cfg).eval()
    rules = unet_rules(ours)
    theirs.load_state_dict(to_theirs(rules, ours.state_dict()), strict=True)
    x, t = torch.randn(2, p["in_channels"], 16, 16), torch.tensor([7, 640])
    kw, dkw = {}, {}
    if "context_dim" in p:
        kw["context"] = dkw["encoder_hidden_states"] = torch.randn(2, 5, p["context_dim"])
    if "num_classes" in p:
        kw["y"] = dkw["class_labels"] = torch.tensor([1, 8])
    a, b = ours(x, t, **kw), theirs(x, t, **dkw).sample
    _report(name[:7], f"unet {kind}", (a - b).abs().max().item())
    assert a.abs().max() > 1e-2 and (a - b).abs().max() < TOL
    back = UNetModel(**unet_params_from_diffusers(kind, dict(theirs.config)))
    sd = to_ours(unet_rules(back), theirs.state_dict())
    back.load_state_dict(sd, strict=True)
    assert (back(x, t, **kw) - a).abs().max() < 1e-5
    if p.get("use_new_attention_order"):
        # diffusers has no field for the qkv order: a derived config uses the original's (legacy)
        # one, so the import is equivalent, not bit-identical (ldm_config.yaml of our exports is)
        assert not back.middle_block[1].attention.__class__.__name__.endswith("QKVAttention")
    else:
        _assert_same_state_dict(ours.state_dict(), sd)


def test_stored_config_import_loads_strictly(exported, tmp_path):
    """--stored-config: our exports carry ldm_config.yaml (EMA off: the folder holds one set of weights)."""
    cfg, model, root, tmp = exported["cin"]
    config, sd = import_diffusers(root, use_stored_config=True)
    assert config["model"]["params"]["use_ema"] is False
    _assert_same_state_dict(model.state_dict(), sd)


@pytest.mark.parametrize("config, kind, heads", [
    ("configs/stable-diffusion/v1-inference.yaml", "UNet2DConditionModel", 8),
    ("configs/stable-diffusion/v2-inference-v.yaml", "UNet2DConditionModel", [5, 10, 20, 20]),
    ("configs/ldm/celebahq.yaml", "UNet2DModel", 32),          # = CompVis/ldm-celebahq-256's config
    ("configs/ldm/cin256.yaml", "UNet2DConditionModel", 1),
])
def test_released_size_unets_map_onto_diffusers_configs(config, kind, heads):
    """Full-size UNets on the meta device (no memory): the config diffusers' own SD / LDM folders
    have, and a key map covering exactly diffusers' state dict."""
    from omegaconf import OmegaConf

    from ldm.interop.unet import diffusers_unet_config, unet_rules
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    p = OmegaConf.to_container(OmegaConf.load(ROOT / config).model.params.unet_config.params)
    with torch.device("meta"):
        ours = UNetModel(**p)
    got_kind, cfg = diffusers_unet_config(ours)
    assert got_kind == kind and cfg["attention_head_dim"] == heads
    with torch.device("meta"):
        theirs = getattr(diffusers, kind)(**cfg)
    rules = unet_rules(ours)
    assert {k for r in rules for k in r.theirs} == set(theirs.state_dict())
    assert {k for r in rules for k in r.ours} == set(ours.state_dict())
