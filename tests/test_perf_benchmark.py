"""scripts/benchmark.py: the diffusers equivalents compute what ours do, with shared weights,
and a tiny end-to-end run writes the report."""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from conftest import ROOT, reference_or_skip
from ldm.modules.diffusionmodules.openaimodel import UNetModel

torch.set_num_threads(1)
pytest.importorskip("diffusers", reason="optional benchmark dependency (pip install -e .[bench])")


def bench():
    name = "_ldm_scripts_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "benchmark.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)   # registered: its dataclasses need it
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


UNETS = {
    "crossattn": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
                      num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                      context_dim=16, legacy=False),
    "attention_block": dict(image_size=8, in_channels=3, out_channels=3, model_channels=32,
                            attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2], num_head_channels=16),
}


@pytest.mark.parametrize("kind", sorted(UNETS))
def test_diffusers_unet_equivalent_with_shared_weights(kind):
    b = bench()
    params = UNETS[kind]
    unet = UNetModel(**params)
    b.randomize(unet, seed=1)
    dm, shared = b.diffusers_unet(unet, params)
    x, t = torch.randn(2, params["in_channels"], 8, 8), torch.tensor([3, 700])
    ctx = torch.randn(2, 5, 16) if "context_dim" in params else None
    with torch.no_grad():
        ours = unet(x, t, context=ctx)
        theirs = dm(x, t, encoder_hidden_states=ctx).sample if ctx is not None else dm(x, t).sample
    assert ours.abs().max() > 0.1
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()
    n_params = len(list(dm.parameters()))
    if kind == "crossattn":
        assert shared == n_params          # identical layouts: every tensor is ours
    else:
        # all but, in each of the 4 attention blocks, the qkv weight and bias (split into
        # to_q/k/v) and the proj_out weight (1x1 conv kernel -> linear matrix)
        assert shared == n_params - 4 * 7
    with torch.no_grad():
        unet.out[2].bias.add_(1.0)       # shared: diffusers sees the change
    assert torch.equal(dm.conv_out.bias, unet.out[2].bias)


@pytest.mark.parametrize("vq", [False, True])
def test_diffusers_autoencoder_equivalent(vq):
    from ldm.models.autoencoder import AutoencoderKL, VQModelInterface
    b = bench()
    dd = dict(double_z=not vq, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    loss = {"target": "torch.nn.Identity"}
    torch.manual_seed(0)
    ours = (VQModelInterface(embed_dim=3, n_embed=16, ddconfig=dd, lossconfig=loss) if vq
            else AutoencoderKL(ddconfig=dd, lossconfig=loss, embed_dim=3)).eval()
    b.randomize(ours, seed=2)
    theirs = b.diffusers_autoencoder(ours, dd, 3, 16 if vq else None)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        enc, denc = ours.encode(x), theirs.encode(x)
        h = enc if vq else enc.mean
        h2 = denc.latents if vq else denc.latent_dist.mean
        assert (h - h2).abs().max() <= 1e-5 * h.abs().max()
        dec, ddec = ours.decode(h), theirs.decode(h).sample
    assert (dec - ddec).abs().max() <= 1e-4 * dec.abs().max()


def test_tiny_end_to_end_sample_run(tmp_path):
    ref = reference_or_skip()
    b = bench()
    cfg = ref / "golden" / "_models" / "ldm_crossattn" / "config.yaml"
    out = tmp_path / "r.json"
    result = b.run(b.parse_args(["--config", str(cfg), "--mode", "sample", "--steps", "2", "--batch", "2",
                                 "--iters", "1", "--warmup", "1", "--compare", "diffusers", "--device", "cpu",
                                 "--flops", "on", "--json", str(out)]))
    assert json.loads(out.read_text())["ratios"] == result["ratios"]
    rows = {(r["setup"], r["variant"]): r for r in result["results"]}
    assert set(rows) == {(s, v) for s in ("ddim", "ddim-cfg") for v in ("ours", "diffusers")}
    # a guided step evaluates the UNet on 2 B samples; the same FLOPs in both implementations
    assert math.isclose(rows["ddim-cfg", "ours"]["flops"], 2 * rows["ddim", "ours"]["flops"], rel_tol=0.05)
    assert math.isclose(rows["ddim", "ours"]["flops"], rows["ddim", "diffusers"]["flops"], rel_tol=0.05)
    # the whole DDIM chain agrees: same schedule (+1 offset, abar_0 at the end), same network
    assert result["agreement"]["ddim-cfg_samples_max_abs_diff_diffusers"] < 1e-4
    assert result["agreement"]["unet_max_abs_diff"] < 1e-5 * max(1.0, result["agreement"]["unet_output_max_abs"])
