"""The original-path modules added for the public surface behave as their originals: DPM-Solver's
functional interface equals DPMSolverSampler, the OpenAI-CLIP embedders load a local file (and
name it when missing), the BSRGAN functions keep their original signatures, the model.py /
openaimodel.py helpers run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_scripts_common import tiny  # noqa: F401


def test_dpm_solver_functional_interface_equals_the_sampler(tiny):
    from ldm import scripting as S
    from ldm.models.diffusion.dpm_solver import DPMSolverSampler
    from ldm.models.diffusion.dpm_solver.dpm_solver import DPM_Solver, NoiseScheduleVP, model_wrapper
    model = S.load_model(*tiny("configs/ldm/cin256.yaml"), "cpu")
    with torch.no_grad():
        c = model.get_learned_conditioning({"class_label": torch.tensor([1, 2])})
        uc = model.get_learned_conditioning({"class_label": torch.tensor([1000, 1000])})
        x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        ref, _ = DPMSolverSampler(model).sample(6, 2, (3, 8, 8), conditioning=c, x_T=x_T, verbose=False,
                                                unconditional_guidance_scale=3.0, unconditional_conditioning=uc)
        ns = NoiseScheduleVP("discrete", alphas_cumprod=model.alphas_cumprod)
        fn = model_wrapper(lambda x, t, cond: model.apply_model(x, t, cond), ns, model_type="noise",
                           guidance_type="classifier-free", condition=c, unconditional_condition=uc, guidance_scale=3.0)
        out = DPM_Solver(fn, ns, predict_x0=True).sample(x_T, steps=6, order=2, method="multistep")
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    with pytest.raises(NotImplementedError, match="multistep"):
        DPM_Solver(fn, ns).sample(x_T, steps=6)
    # the continuous schedules: lambda and its inverse are consistent
    for kind in ("linear", "cosine"):
        s = NoiseScheduleVP(kind)
        t = torch.tensor([0.1, 0.5, 0.9])
        assert torch.allclose(s.inverse_lambda(s.marginal_lambda(t)), t, atol=1e-4)


def _tiny_openai_clip_file(tmp_path):
    from open_clip.model import CLIP
    torch.manual_seed(0)
    m = CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, layers=1, width=64),
             text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1), quick_gelu=True)
    path = tmp_path / "tiny-clip.pt"
    torch.save(m.state_dict(), path)
    return m.eval(), path


def test_openai_clip_embedders_load_a_local_file(tmp_path, monkeypatch):
    import open_clip
    from ldm.modules.encoders.modules import FrozenCLIPTextEmbedder, FrozenClipImageEmbedder
    ref, path = _tiny_openai_clip_file(tmp_path)
    text = FrozenCLIPTextEmbedder(str(path), n_repeat=2)
    with torch.no_grad():
        z = text.encode(["a photo of a cat", "a dog"])
        want = ref.encode_text(open_clip.tokenize(["a photo of a cat", "a dog"]))
    assert z.shape == (2, 2, 32) and torch.allclose(z[:, 0], want / want.norm(dim=-1, keepdim=True), atol=1e-5)
    image = FrozenClipImageEmbedder(str(path))
    assert image(torch.rand(2, 3, 48, 48) * 2 - 1).shape == (2, 32) and image.antialias is False
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\.cache/clip/ViT-L-14\.pt"):
        FrozenCLIPTextEmbedder("ViT-L/14")


def test_bsrgan_original_signatures_and_seeded_draws():
    from ldm.modules.image_degradation import bsrgan, bsrgan_light, utils_image
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a = bsrgan_light.degradation_bsrgan_variant(img, sf=4, rng=3)["image"]
    b = bsrgan_light.degradation_bsrgan_variant(img, sf=4, rng=3)["image"]
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    hq = utils_image.uint2single(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    lq, hq_crop = bsrgan.degradation_bsrgan(hq, sf=4, lq_patchsize=16, rng=0)
    assert lq.shape == (16, 16, 3) and hq_crop.shape == (64, 64, 3)
    k = bsrgan.fspecial("gaussian", 7, 1.5)
    assert k.shape == (7, 7) and abs(k.sum() - 1) < 1e-9 and k[3, 3] == k.max()
    assert utils_image.calculate_psnr(img, img) == float("inf") and utils_image.calculate_ssim(img, img) == pytest.approx(1.0)
    x = torch.rand(3, 16, 16)
    assert utils_image.imresize(x, 0.5).shape == (3, 8, 8)


def test_model_and_openaimodel_helpers_run():
    from ldm.modules.diffusionmodules import model as M
    from ldm.modules.diffusionmodules.openaimodel import EncoderUNetModel
    torch.manual_seed(0)
    unet = M.Model(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[8], in_channels=3,
                   resolution=16)
    assert unet(torch.randn(2, 3, 16, 16), torch.tensor([1, 500])).shape == (2, 3, 16, 16)
    assert M.Upsampler(8, 16, 32, 3)(torch.randn(1, 32, 8, 8)).shape == (1, 3, 16, 16)
    assert M.MergedRescaleEncoder(3, 32, 16, 4, 1, [], ch_mult=(1, 2), rescale_factor=0.5)(
        torch.randn(1, 3, 16, 16)).shape == (1, 4, 4, 4)
    emb = M.get_timestep_embedding(torch.tensor([0, 10]), 8)
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    for pool in ("adaptive", "attention", "spatial"):
        clf = EncoderUNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=5, num_res_blocks=1,
                               attention_resolutions=[2], channel_mult=(1, 2), num_head_channels=16, pool=pool)
        assert clf(torch.randn(2, 4, 8, 8), torch.tensor([3, 900])).shape == (2, 5)
