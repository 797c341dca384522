"""UNetModel, its blocks and attention: numerics against direct formulas, options, checkpointing."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer, attention
from ldm.modules.diffusionmodules.openaimodel import (
    AttentionBlock,
    QKVAttention,
    QKVAttentionLegacy,
    UNetModel,
)
from ldm.modules.diffusionmodules.util import GroupNorm32, timestep_embedding

torch.set_num_threads(1)


def tiny_unet(**kw) -> UNetModel:
    args = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                num_res_blocks=1, channel_mult=[1, 2], num_heads=2)
    args.update(kw)
    return UNetModel(**args)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (zero_module would otherwise make outputs 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel())))
    return model


# ---------------------------------------------------------------------------------------
# timestep embedding
# ---------------------------------------------------------------------------------------
def test_timestep_embedding_matches_formula():
    t = torch.tensor([0, 1, 17, 999])
    dim = 10
    emb = timestep_embedding(t, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None].double() * freqs[None]
    want = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)   # cos first, then sin
    assert emb.dtype == torch.float32 and emb.shape == (4, dim)
    assert torch.allclose(emb.double(), want, atol=2e-4)            # float32 arguments up to ~1e3
    assert torch.equal(emb[0], torch.tensor([1.0] * half + [0.0] * half))


def test_timestep_embedding_odd_dim_and_repeat_only():
    t = torch.tensor([3.0, 5.0])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (2, 7) and torch.equal(emb[:, -1], torch.zeros(2))
    assert torch.equal(timestep_embedding(t, 4, repeat_only=True), t[:, None].expand(2, 4))


def test_groupnorm32_computes_in_float32():
    gn = GroupNorm32(2, 4)
    x = (torch.randn(2, 4, 3, 3) * 100 + 1000).to(torch.bfloat16)
    out = gn(x)
    assert out.dtype == torch.bfloat16
    ref = F.group_norm(x.float(), 2, gn.weight, gn.bias, gn.eps)
    assert torch.allclose(out.float(), ref, atol=2e-2)


# ---------------------------------------------------------------------------------------
# attention == explicit softmax(QK^T / sqrt(d)) V
# ---------------------------------------------------------------------------------------
def explicit_attention(q, k, v, scale, mask=None):
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if mask is not None:
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    return torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)


def test_cross_attention_matches_einsum_reference():
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=12, context_dim=6, heads=3, dim_head=5).double()
    x, ctx = torch.randn(2, 7, 12, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])

    def split(t):
        return t.view(2, t.shape[1], 3, 5).transpose(1, 2)

    q, k, v = split(attn.to_q(x)), split(attn.to_k(ctx)), split(attn.to_v(ctx))
    for m in (None, mask):
        ref = explicit_attention(q, k, v, 5 ** -0.5, None if m is None else m[:, None, None, :])
        ref = attn.to_out(ref.transpose(1, 2).reshape(2, 7, 15))
        assert torch.allclose(attn(x, context=ctx, mask=m), ref, atol=1e-12)
    # no context: self-attention
    q, k, v = split(attn.to_q(x)), None, None
    with pytest.raises(RuntimeError):
        attn(x)   # to_k expects context_dim=6 features: x has 12


def test_legacy_and_new_order_qkv_attention_match_reference():
    torch.manual_seed(1)
    bs, heads, ch, T = 2, 3, 4, 5
    qkv = torch.randn(bs, 3 * heads * ch, T, dtype=torch.float64)
    # legacy: heads first, then q/k/v; scaling q and k each by ch^-1/4 as the original
    q, k, v = qkv.reshape(bs * heads, 3 * ch, T).split(ch, dim=1)
    s = ch ** -0.25
    w = torch.einsum("bct,bcs->bts", q * s, k * s).softmax(-1)
    ref = torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, T)
    assert torch.allclose(QKVAttentionLegacy(heads)(qkv), ref, atol=1e-12)
    # new order: q/k/v first, then heads
    q, k, v = (t.reshape(bs * heads, ch, T) for t in qkv.chunk(3, dim=1))
    w = torch.einsum("bct,bcs->bts", q * s, k * s).softmax(-1)
    ref = torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, T)
    assert torch.allclose(QKVAttention(heads)(qkv), ref, atol=1e-12)


def test_attention_block_orders_agree_with_permuted_qkv_weights():
    torch.manual_seed(2)
    legacy = randomize(AttentionBlock(64, num_heads=4))
    new = AttentionBlock(64, num_heads=4, use_new_attention_order=True)
    new.load_state_dict(legacy.state_dict())
    # legacy rows are [head][q,k,v][ch]; the new order wants [q,k,v][head][ch]
    perm = torch.arange(3 * 64).view(4, 3, 16).transpose(0, 1).reshape(-1)
    with torch.no_grad():
        new.qkv.weight.copy_(legacy.qkv.weight[perm])
        new.qkv.bias.copy_(legacy.qkv.bias[perm])
    x = torch.randn(2, 64, 4, 4)
    assert torch.allclose(legacy(x), new(x), atol=1e-5)
    assert not torch.allclose(legacy(x), x, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_attention_accumulates_in_float32(dtype):
    torch.manual_seed(3)
    qd, kd, vd = (torch.randn(2, 2, 64, 32).mul(3).to(dtype) for _ in range(3))
    # exact result for the rounded inputs: only the computation's error is measured
    ref = explicit_attention(qd.double(), kd.double(), vd.double(), 32 ** -0.5)
    got = attention(qd, kd, vd, 32 ** -0.5).double()
    # naive low-precision computation for comparison (scores and softmax in `dtype`)
    naive = (torch.einsum("bhid,bhjd->bhij", qd, kd) * 32 ** -0.5).softmax(-1)
    naive = torch.einsum("bhij,bhjd->bhid", naive, vd).double()
    err, naive_err = (got - ref).abs().max(), (naive - ref).abs().max()
    # float32 accumulation: about the output's own rounding, 10x below the naive error
    out_ulp = torch.finfo(dtype).eps * ref.abs().max()
    assert err <= 0.2 * naive_err and err <= out_ulp, (err, naive_err, out_ulp)


# ---------------------------------------------------------------------------------------
# UNet behaviour
# ---------------------------------------------------------------------------------------
def test_fresh_unet_predicts_exactly_zero():
    torch.manual_seed(0)
    model = tiny_unet(use_spatial_transformer=True, context_dim=8)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), context=torch.randn(2, 3, 8))
    assert out.shape == (2, 4, 8, 8) and torch.count_nonzero(out) == 0


def test_unet_depends_on_timestep_class_and_context():
    torch.manual_seed(0)
    model = randomize(tiny_unet(model_channels=64, num_classes=5, use_spatial_transformer=True, context_dim=8,
                                num_heads=-1, num_head_channels=32, legacy=False))
    x, t, y, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 4]), torch.randn(2, 3, 8)
    out = model(x, t, context=c, y=y)
    for kw in (dict(timesteps=t + 37), dict(y=(y + 1) % 5), dict(context=c * 0.5)):
        args = dict(timesteps=t, context=c, y=y) | kw
        assert (model(x, **args) - out).abs().max() > 1e-3, kw
    with pytest.raises(AssertionError):
        model(x, t, context=c)     # class-conditional model needs y


def test_channels_last_input_same_output():
    torch.manual_seed(0)
    model = randomize(tiny_unet(model_channels=64, use_spatial_transformer=True, context_dim=8))
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 3, 8)
    out = model(x, t, context=c)
    out_cl = model(x.contiguous(memory_format=torch.channels_last), t, context=c)
    assert torch.allclose(out, out_cl, atol=1e-5)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kw", [
    dict(num_res_blocks=[1, 2], resblock_updown=True, use_scale_shift_norm=True),
    dict(use_new_attention_order=True, num_heads=-1, num_head_channels=16, legacy=False),
    dict(num_classes="continuous"),
    dict(num_classes="sequential", adm_in_channels=6),
    dict(use_spatial_transformer=True, context_dim=[8, 8], transformer_depth=2, use_linear_in_transformer=True,
         disable_self_attentions=[True, True], num_attention_blocks=[1, 1]),
    dict(dims=1),
    dict(conv_resample=False, channel_mult=[1, 1]),
])
def test_unet_options_forward_shapes(kw):
    torch.manual_seed(0)
    model = randomize(tiny_unet(**kw))
    dims = kw.get("dims", 2)
    x = torch.randn(2, 4, *([8] * dims))
    args = {}
    if kw.get("num_classes") == "continuous":
        args["y"] = torch.rand(2, 1)
    elif kw.get("num_classes") == "sequential":
        args["y"] = torch.randn(2, 6)
    if kw.get("use_spatial_transformer"):
        args["context"] = [torch.randn(2, 3, 8), torch.randn(2, 5, 8)]
    out = model(x, torch.tensor([1, 2]), **args)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_disable_self_attention_gives_attn1_context_keys():
    model = tiny_unet(use_spatial_transformer=True, context_dim=8, disable_self_attentions=[False, True])
    sd = model.state_dict()
    # level 1 (ds=2, 64 channels) has attention; attn1 now reads the 8-wide context
    assert sd["input_blocks.3.1.transformer_blocks.0.attn1.to_k.weight"].shape == (64, 8)
    assert sd["middle_block.1.transformer_blocks.0.attn1.to_k.weight"].shape == (64, 64)


def test_codebook_head_predicts_n_embed_logits():
    model = randomize(tiny_unet(n_embed=11))
    out = model(torch.randn(1, 4, 8, 8), torch.tensor([5]))
    assert out.shape == (1, 11, 8, 8)
    assert "id_predictor.1.weight" in model.state_dict()


def test_spatial_transformer_per_depth_context():
    torch.manual_seed(0)
    st = randomize(SpatialTransformer(32, 2, 16, depth=2, context_dim=[4, 6]))
    x = torch.randn(1, 32, 3, 3)
    c1, c2 = torch.randn(1, 2, 4), torch.randn(1, 5, 6)
    out = st(x, [c1, c2])
    assert out.shape == x.shape
    assert not torch.allclose(out, st(x, [c1, c2 * 2]))


# ---------------------------------------------------------------------------------------
# activation checkpointing
# ---------------------------------------------------------------------------------------
def saved_activation_bytes_and_grads(model, x, t, c):
    """Bytes of tensors autograd keeps for backward outside checkpointed regions, and the grads."""
    total = 0
    params = {p.data_ptr() for p in model.parameters()}

    def pack(tensor):
        nonlocal total
        if tensor.data_ptr() not in params:
            total += tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, t, context=c)
    out.square().mean().backward()
    return total, [p.grad.clone() for p in model.parameters()]


def test_use_checkpoint_same_gradients_less_saved_memory():
    torch.manual_seed(0)
    plain = randomize(tiny_unet(model_channels=64, use_spatial_transformer=True, context_dim=8, dropout=0.1))
    ckpt = tiny_unet(model_channels=64, use_spatial_transformer=True, context_dim=8, dropout=0.1,
                     use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 3, 8)
    torch.manual_seed(5)
    mem_plain, g_plain = saved_activation_bytes_and_grads(plain, x, t, c)
    torch.manual_seed(5)
    mem_ckpt, g_ckpt = saved_activation_bytes_and_grads(ckpt, x, t, c)
    for a, b in zip(g_plain, g_ckpt):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)   # dropout RNG replayed on recompute
    assert mem_ckpt < 0.4 * mem_plain, (mem_ckpt, mem_plain)


def test_checkpoint_is_plain_call_without_grad():
    block = BasicTransformerBlock(16, 2, 8, checkpoint=True)
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        assert torch.equal(block(x), block._forward(x))
