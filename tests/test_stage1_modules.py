"""First-stage building blocks: posterior, attention, resampling, encoder/decoder layout, quantiser."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Downsample, Encoder, make_attn
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, normal_kl
from ldm.modules.vqvae.quantize import VectorQuantizer2

DD = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
          num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


# ---------------------------------------------------------------- posterior
def test_diagonal_gaussian_kl_nll_match_closed_forms() -> None:
    torch.manual_seed(0)
    params = torch.randn(2, 6, 3, 3)
    p = DiagonalGaussianDistribution(params)
    ref = torch.distributions.Normal(p.mean, p.std)
    std_normal = torch.distributions.Normal(torch.zeros_like(p.mean), torch.ones_like(p.mean))
    kl_ref = torch.distributions.kl_divergence(ref, std_normal).sum(dim=[1, 2, 3])
    assert torch.allclose(p.kl(), kl_ref, atol=1e-5)
    q = DiagonalGaussianDistribution(torch.randn(2, 6, 3, 3))
    kl_pq = torch.distributions.kl_divergence(ref, torch.distributions.Normal(q.mean, q.std)).sum(dim=[1, 2, 3])
    assert torch.allclose(p.kl(q), kl_pq, atol=1e-4)
    assert torch.allclose(normal_kl(p.mean, p.logvar, 0.0, 0.0).sum(dim=[1, 2, 3]), kl_ref, atol=1e-5)
    x = torch.randn(2, 3, 3, 3)
    assert torch.allclose(p.nll(x), -ref.log_prob(x).sum(dim=[1, 2, 3]), atol=1e-4)
    assert torch.equal(p.mode(), params[:, :3])


def test_diagonal_gaussian_clamps_logvar_and_samples_one_randn(monkeypatch) -> None:
    params = torch.cat([torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 100.0)], dim=1)
    p = DiagonalGaussianDistribution(params)
    assert float(p.logvar.max()) == 20.0 and torch.allclose(p.std, torch.full_like(p.std, math.exp(10.0)))
    calls = []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: calls.append(a) or torch.ones(*a[0]))
    s = DiagonalGaussianDistribution(torch.zeros(1, 4, 2, 2)).sample()   # std = 1
    assert calls == [(torch.Size([1, 2, 2, 2]),)] and torch.equal(s, torch.ones(1, 2, 2, 2))
    det = DiagonalGaussianDistribution(torch.linspace(-1, 1, 16).reshape(1, 4, 2, 2), deterministic=True)
    assert float(det.kl().sum()) == 0.0 and torch.equal(det.std, torch.zeros_like(det.mean))


# ---------------------------------------------------------------- blocks
def test_attnblock_sdpa_equals_explicit_softmax_attention() -> None:
    torch.manual_seed(0)
    blk = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 5)
    h = blk.norm(x)
    q, k, v = (m(h).reshape(2, 32, 20) for m in (blk.q, blk.k, blk.v))
    w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) / math.sqrt(32), dim=2)      # (B, Nq, Nk)
    ref = x + blk.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(2, 32, 4, 5))
    assert torch.allclose(blk(x), ref, atol=1e-5)


def test_downsample_pads_right_and_bottom_only() -> None:
    d = Downsample(1, with_conv=True)
    with torch.no_grad():
        d.conv.weight.zero_()
        d.conv.weight[0, 0, 0, 0] = 1.0          # picks the top-left tap of each 3x3 window
        d.conv.bias.zero_()
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(d(x), x[:, :, ::2, ::2])   # no padding on the top/left
    assert torch.equal(Downsample(1, with_conv=False)(x), torch.nn.functional.avg_pool2d(x, 2))


def test_encoder_decoder_shapes_and_key_layout() -> None:
    torch.manual_seed(0)
    enc, dec = Encoder(**DD), Decoder(**DD)
    x = torch.randn(1, 3, 16, 16)
    moments = enc(x)
    assert moments.shape == (1, 8, 8, 8)
    assert dec(moments[:, :4]).shape == (1, 3, 16, 16)
    keys = set(enc.state_dict()) | {"dec." + k for k in dec.state_dict()}
    for k in ("down.0.block.0.conv1.weight", "down.1.block.0.nin_shortcut.weight", "down.1.attn.0.q.weight",
              "down.0.downsample.conv.weight", "mid.attn_1.proj_out.bias", "conv_out.weight",
              "dec.up.1.upsample.conv.weight", "dec.up.1.attn.1.k.weight", "dec.up.0.block.0.nin_shortcut.weight",
              "dec.mid.block_2.norm2.weight", "dec.norm_out.bias"):
        assert k in keys, k
    assert enc.down[1].attn[0].norm.eps == 1e-6 and enc.down[1].attn[0].norm.num_groups == 32


def test_attn_types_and_checkpointing_keep_outputs() -> None:
    assert isinstance(make_attn(32, "none"), torch.nn.Identity)
    assert isinstance(make_attn(32, "vanilla-xformers"), AttnBlock)
    assert set(make_attn(32, "linear").state_dict()) == {"to_qkv.weight", "to_out.weight", "to_out.bias"}
    with pytest.raises(ValueError, match="attn_type"):
        make_attn(32, "flash")
    torch.manual_seed(0)
    enc = Encoder(**DD)
    enc_ckpt = Encoder(**DD, use_checkpoint=True)
    enc_ckpt.load_state_dict(enc.state_dict())
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    g1, = torch.autograd.grad(enc(x).square().sum(), x)
    g2, = torch.autograd.grad(enc_ckpt(x).square().sum(), x)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_builds_on_meta_device() -> None:
    with torch.device("meta"):
        enc = Encoder(**DD)
        vq = VectorQuantizer2(8, 4, beta=0.25)
    assert enc.conv_in.weight.is_meta and vq.embedding.weight.is_meta


# ---------------------------------------------------------------- quantiser
def test_quantizer_indices_are_brute_force_argmin_and_gradient_is_straight_through() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer2(n_e=10, e_dim=3, beta=0.25)
    torch.nn.init.normal_(vq.embedding.weight)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    zq, loss, (perplexity, encodings, idx) = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    brute = torch.cdist(flat, vq.embedding.weight.detach()).argmin(dim=1)
    assert perplexity is None and encodings is None
    assert torch.equal(idx, brute) and idx.shape == (40,)
    assert torch.allclose(zq, vq.embedding.weight[brute].reshape(2, 4, 5, 3).permute(0, 3, 1, 2), atol=1e-6)
    mse = torch.mean((vq.embedding.weight[brute].detach() - flat) ** 2)
    assert torch.allclose(loss, 1.25 * mse)
    g, = torch.autograd.grad((zq * torch.arange(60.0).reshape(3, 4, 5)).sum(), z, retain_graph=True)
    assert torch.equal(g, torch.arange(60.0).reshape(3, 4, 5).expand(2, 3, 4, 5))   # identity Jacobian


def test_quantizer_legacy_beta_weights_the_codebook_term() -> None:
    torch.manual_seed(0)
    z = torch.randn(1, 2, 2, 2, requires_grad=True)
    for legacy, z_factor, e_factor in ((True, 1.0, 0.25), (False, 0.25, 1.0)):
        vq = VectorQuantizer2(4, 2, beta=0.25, legacy=legacy)
        _, loss, (_, _, idx) = vq(z)
        gz, ge = torch.autograd.grad(loss, (z, vq.embedding.weight))
        e = vq.embedding.weight.detach()[idx].reshape(1, 2, 2, 2).permute(0, 3, 1, 2)
        diff = (z.detach() - e) * 2 / z.numel()                       # d mean((z - e)^2) / dz
        assert torch.allclose(gz, z_factor * diff, atol=1e-6)
        assert torch.allclose(ge.sum(), -e_factor * diff.sum(), atol=1e-6)


def test_remap_round_trip_and_unknown_indices(tmp_path, monkeypatch) -> None:
    np.save(tmp_path / "used.npy", np.array([7, 2, 5]))
    monkeypatch.chdir(tmp_path)                                    # relative paths resolve against the cwd
    vq = VectorQuantizer2(8, 2, beta=0.25, remap="used.npy", unknown_index="extra")
    assert vq.re_embed == 4 and vq.unknown_index == 3 and torch.equal(vq.used, torch.tensor([7, 2, 5]))
    full = torch.tensor([[5, 7, 2, 4]])
    sub = vq.remap_to_used(full)
    assert torch.equal(sub, torch.tensor([[2, 0, 1, 3]]))           # 4 is not used -> the extra index
    assert torch.equal(vq.unmap_to_all(sub), torch.tensor([[5, 7, 2, 7]]))       # extra -> used[0]
    entry = vq.get_codebook_entry(sub.reshape(-1), (1, 2, 2, 2))
    assert torch.equal(entry.permute(0, 2, 3, 1).reshape(4, 2), vq.embedding.weight[[5, 7, 2, 7]])
    rnd = VectorQuantizer2(8, 2, beta=0.25, remap="used.npy")      # unknown -> torch.randint (replayable)
    seen = []
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size: seen.append((lo, hi, tuple(size))) or torch.zeros(size, dtype=torch.long))
    assert torch.equal(rnd.remap_to_used(torch.tensor([[4, 6, 2]])), torch.tensor([[0, 0, 1]]))
    assert seen == [(0, 3, (2,))]
