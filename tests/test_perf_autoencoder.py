"""Autoencoder fast paths against their plain definitions: fused SiLU, token-major attention,
the VQ distance (exact indices, lowest index on ties), channels_last / bf16 decode switches and
tiled decoding (blending, bounded tile size)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, ResnetBlock, nonlinearity, tiled_decode
from ldm.modules.vqvae.quantize import VectorQuantizer2

torch.set_num_threads(1)
DD = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], in_channels=3,
          resolution=16, z_channels=4, dropout=0.0)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5 if p.ndim > 1 else 10))
    return module


def test_nonlinearity_is_swish():
    x = torch.randn(1000) * 5
    assert torch.allclose(nonlinearity(x), x * torch.sigmoid(x), atol=1e-6)


def test_attention_equals_the_conv_formulation():
    blk = randomize(AttnBlock(32)).eval()
    x = torch.randn(2, 32, 5, 6)
    h = blk.norm(x)
    q, k, v = (c(h).flatten(2) for c in (blk.q, blk.k, blk.v))         # (B, C, T)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 32 ** -0.5, dim=2)
    ref = x + blk.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(x.shape))
    with torch.no_grad():
        assert torch.allclose(blk(x), ref, atol=1e-5)
    assert torch.allclose(blk(x), ref, atol=1e-5)                        # with autograd recording


def test_in_place_residuals_keep_gradients_right():
    torch.manual_seed(0)
    blk = randomize(ResnetBlock(in_channels=32, out_channels=32, dropout=0.0, temb_channels=0))
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    blk(x).square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    h = blk.conv1(F.silu(blk.norm1(x)))
    (x + blk.conv2(F.silu(blk.norm2(h)))).square().sum().backward()
    assert torch.allclose(g, x.grad, atol=1e-5)


def original_indices(q: VectorQuantizer2, z_flat: torch.Tensor) -> torch.Tensor:
    w = q.embedding.weight
    d = torch.sum(z_flat ** 2, dim=1, keepdim=True) + torch.sum(w ** 2, dim=1) - 2 * torch.einsum(
        "bd,dn->bn", z_flat, w.t())
    return torch.argmin(d, dim=1)


@pytest.mark.parametrize("chunk", [None, 1000])
def test_vq_indices_equal_the_original_expansion(chunk, monkeypatch):
    torch.manual_seed(0)
    q = VectorQuantizer2(n_e=512, e_dim=3, beta=0.25)
    q.embedding.weight.data.normal_()
    if chunk:
        monkeypatch.setattr(VectorQuantizer2, "_CHUNK_ELEMENTS", chunk)    # rows in chunks of 1
    z = torch.randn(3000, 3)
    assert torch.equal(q.nearest_indices(z), original_indices(q, z))


def test_vq_exact_ties_take_the_lowest_index():
    q = VectorQuantizer2(n_e=6, e_dim=2, beta=0.25)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[5., 5.], [1., 0.], [0., 1.], [1., 0.], [-1., 0.], [0., 1.]]))
    z = torch.tensor([[1., 0.], [0., 1.], [0.5, 0.5], [0., 0.]])           # duplicates, equidistant entries
    assert q.nearest_indices(z).tolist() == original_indices(q, z).tolist() == [1, 2, 1, 1]


def test_vq_distance_stays_float32_under_autocast():
    torch.manual_seed(1)
    q = VectorQuantizer2(n_e=256, e_dim=4, beta=0.25)
    q.embedding.weight.data.normal_()
    z = torch.randn(2, 4, 8, 8)
    ref = q(z)[2][2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q(z)[2][2], ref)


def decoder(**switches) -> Decoder:
    torch.manual_seed(0)
    return randomize(Decoder(**DD, **switches), seed=3).eval()


@torch.no_grad()
def test_channels_last_and_bf16_decode_switches():
    z = torch.randn(2, 4, 8, 8)
    ref = decoder()(z)
    cl = decoder(use_channels_last=True)
    assert cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = cl(z)
    assert out.is_contiguous() and torch.allclose(out, ref, atol=1e-4 * ref.abs().max())
    bf = decoder(decode_precision="bf16")(z)
    assert bf.dtype == torch.float32
    assert (bf - ref).abs().max() < 5e-2 * ref.abs().max()
    assert (bf - ref).abs().max() > 0                      # it did run in bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        decoder(decode_precision="int3")


def test_tiled_decode_blends_tiles_exactly_for_a_local_decoder():
    # a decoder whose output pixel depends only on its latent pixel: any blend of tiles is exact
    calls = []

    def local(z):
        calls.append(tuple(z.shape[-2:]))
        return F.interpolate(z[:, :3] * 2 + 1, scale_factor=4, mode="nearest")
    z = torch.randn(1, 4, 21, 30)
    out = tiled_decode(local, z, tile=8, overlap=3, factor=4)
    assert torch.allclose(out, local(z), atol=1e-6)
    # rows start at 0, 5, 10 and 13 (flush with the end), columns at 0, 5, ..., 20 and 22
    assert set(calls[:-1]) == {(8, 8)} and len(calls) - 1 == 4 * 6


@torch.no_grad()
def test_tiled_decoder_matches_whole_decoding_closely():
    z = torch.randn(1, 4, 12, 12)
    whole = decoder()(z)
    assert torch.equal(decoder(decode_tile_size=12)(z), whole)     # fits one tile: not tiled
    tiled = decoder(decode_tile_size=8, decode_tile_overlap=4)(z)
    assert tiled.shape == whole.shape
    # an approximation (attention and convolutions see one tile), but a close one
    assert (tiled - whole).abs().mean() < 0.1 * whole.abs().mean()
    with pytest.raises(ValueError, match="overlap"):
        decoder(decode_tile_size=8, decode_tile_overlap=8)(z)


def test_upsample_conv_by_phases_equals_conv_of_the_upsampled_image():
    from ldm.modules.diffusionmodules.model import Upsample
    torch.manual_seed(0)
    up = Upsample(8, with_conv=True).double()
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64, requires_grad=True)
    ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = up(x)
    assert out.shape == (2, 8, 10, 14) and torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, up.conv.weight), g)
    refs = torch.autograd.grad(ref, (x, up.conv.weight), g)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads, refs))
    cl = up(x.detach().contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, ref, atol=1e-12)
