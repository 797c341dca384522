"""Every config we ship (configs/**/*.yaml, written by several engineers): each `target:` resolves,
and each model builds (meta device) exactly the state-dict listing of the original it corresponds
to (../shared/reference/keys), so the released checkpoints load strictly."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, reference_or_skip
from ldm.util import get_obj_from_str
from test_config_keys import build_on_meta

LD, SD1, SD2 = "latent-diffusion--", "stable-diffusion--", "stablediffusion--"

# ours -> key listing of the original (None: no original, e.g. the quickstart; the model must still build)
ORIGINAL = {
    "autoencoder/kl-f4.yaml": LD + "models_first_stage_models_kl-f4_config.json",
    "autoencoder/kl-f8.yaml": LD + "models_first_stage_models_kl-f8_config.json",
    "autoencoder/kl-f16.yaml": LD + "models_first_stage_models_kl-f16_config.json",
    "autoencoder/kl-f32.yaml": LD + "models_first_stage_models_kl-f32_config.json",
    "autoencoder/vq-f4.yaml": LD + "models_first_stage_models_vq-f4_config.json",
    "autoencoder/vq-f8.yaml": LD + "models_first_stage_models_vq-f8_config.json",
    "autoencoder/vq-f16.yaml": LD + "models_first_stage_models_vq-f16_config.json",
    "ldm/celebahq.yaml": LD + "models_ldm_celeba256_config.json",
    "ldm/ffhq.yaml": LD + "models_ldm_ffhq256_config.json",
    "ldm/lsun_bedrooms.yaml": LD + "models_ldm_lsun_beds256_config.json",
    "ldm/lsun_churches.yaml": LD + "models_ldm_lsun_churches256_config.json",
    "ldm/cin256.yaml": LD + "configs_latent-diffusion_cin256-v2.json",
    "ldm/txt2img-1p4B.yaml": LD + "configs_latent-diffusion_txt2img-1p4B-eval.json",
    "ldm/sr_bsr.yaml": LD + "models_ldm_bsr_sr_config.json",
    "ldm/inpainting.yaml": LD + "models_ldm_inpainting_big_config.json",
    "ldm/layout2img.yaml": LD + "models_ldm_layout2img-openimages256_config.json",
    "ldm/semantic_synthesis.yaml": LD + "models_ldm_semantic_synthesis256_config.json",
    "stable-diffusion/v1-inference.yaml": SD1 + "configs_stable-diffusion_v1-inference.json",
    "stable-diffusion/v2-inference.yaml": SD2 + "configs_stable-diffusion_v2-inference.json",
    "stable-diffusion/v2-inference-v.yaml": SD2 + "configs_stable-diffusion_v2-inference-v.json",
    "stable-diffusion/v2-inpainting.yaml": SD2 + "configs_stable-diffusion_v2-inpainting-inference.json",
    "stable-diffusion/x4-upscaling.yaml": SD2 + "configs_stable-diffusion_x4-upscaling.json",
    "quickstart/autoencoder_kl_digits.yaml": None,
    "quickstart/ldm_digits.yaml": None,
    "classifier/digits_noisy_latent_classifier.yaml": None,   # the original ships no classifier config
    "eval/presets.yaml": None,              # evaluation protocols, no model
    # fine-tuning: the inference architectures plus EMA (released full checkpoints hold model_ema.* too)
    "stable-diffusion/v1-finetune.yaml": None,
    "stable-diffusion/v2-finetune.yaml": None,
    "stable-diffusion/v2-finetune-v.yaml": None,
    # your own data (README "Train on your own images")
    **{f"custom/autoencoder-{n}.yaml": None for n in ("kl-f4", "kl-f8", "vq-f4")},
    **{f"custom/ldm-{c}-{f}.yaml": None for c in ("uncond", "class", "caption-bert", "caption-clip")
       for f in ("kl-f8", "vq-f4")},
}
ALL_CONFIGS = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml"))
# overlays, merged after a base config (`-b base.yaml overlay.yaml`); each has its own merge test:
# recipes (tests/test_recipes_overlays.py), scale-out presets (tests/test_perf_scaleout.py), the
# in-training evaluation overlay (tests/test_eval_in_training.py)
OVERLAYS = [n for n in ALL_CONFIGS if n.startswith(("recipes/", "scale/")) or n == "eval/in_training_digits.yaml"]
SHIPPED = [n for n in ALL_CONFIGS if n not in OVERLAYS]


def targets(node):
    if OmegaConf.is_dict(node):
        if "target" in node:
            yield str(node["target"])
        for v in node.values():
            yield from targets(v)
    elif OmegaConf.is_list(node):
        for v in node:
            yield from targets(v)


def test_every_shipped_config_is_in_the_table():
    assert SHIPPED == sorted(ORIGINAL), (
        f"add these configs to ORIGINAL in {__file__}: {sorted(set(SHIPPED) - set(ORIGINAL))}; "
        f"remove: {sorted(set(ORIGINAL) - set(SHIPPED))}")


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_target_resolves(name):
    cfg = OmegaConf.load(ROOT / "configs" / name)
    found = sorted(set(targets(cfg)))
    unresolved = []
    for target in found:
        try:
            get_obj_from_str(target)
        except Exception as e:   # noqa: BLE001 - report every bad target at once
            unresolved.append(f"{target}: {type(e).__name__}: {e}")
    assert not unresolved, f"{name}: " + "; ".join(unresolved)
    if "model" in cfg and name not in OVERLAYS:
        assert found, f"{name} names no target"


MODELS = [n for n in SHIPPED if n in ORIGINAL and "model" in OmegaConf.load(ROOT / "configs" / n)]


@pytest.mark.parametrize("name", MODELS)
def test_config_builds_the_original_architecture(name):
    model = build_on_meta(ROOT / "configs" / name)
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    listing = ORIGINAL[name]
    if listing is None:
        return
    spec = json.loads((reference_or_skip() / "keys" / listing).read_text())
    got = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    want = {k: (list(s), d) for k, s, d in spec["state_dict"]}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not unexpected, (f"{name} vs {spec['config']}: missing {missing[:5]} "
                                            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    wrong = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    assert not wrong, f"{name} vs {spec['config']}: {len(wrong)} shape/dtype differences, e.g. {wrong[:3]}"
    assert sum(p.numel() for p in model.parameters()) == spec["n_params"]
