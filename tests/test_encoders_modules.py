"""Conditioning encoders: class dropout, rescaler, LDM text transformer, CLIP / OpenCLIP offline."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ldm.modules.encoders import modules as enc
from ldm.modules.encoders.modules import (
    BERTEmbedder,
    BERTTokenizer,
    ClassEmbedder,
    FrozenCLIPEmbedder,
    CLIPEmbeddingNoiseAugmentation,
    FrozenOpenCLIPEmbedder,
    FrozenOpenCLIPImageEmbedder,
    HubWeightsMissing,
    SpatialRescaler,
)
from ldm.modules.x_transformer import Attention

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# ClassEmbedder
# ---------------------------------------------------------------------------------------
def test_class_embedder_ucg_dropout_to_unconditional_class():
    emb = ClassEmbedder(embed_dim=4, n_classes=11, key="class_label", ucg_rate=1.0)
    batch = {"class_label": torch.tensor([0, 3, 7])}
    out = emb(batch)
    assert out.shape == (3, 1, 4)
    assert torch.equal(out, emb.embedding.weight[10].expand(3, 1, 4))          # all -> class 10
    assert torch.equal(emb(batch, disable_dropout=True)[:, 0], emb.embedding.weight[[0, 3, 7]])
    emb.eval()
    assert torch.equal(emb(batch)[:, 0], emb.embedding.weight[[0, 3, 7]])     # no dropout at inference
    uc = emb.get_unconditional_conditioning(2)
    assert torch.equal(uc["class_label"], torch.tensor([10, 10]))
    assert torch.equal(emb(uc)[:, 0], emb.embedding.weight[[10, 10]])


def test_class_embedder_ucg_rate_fraction_and_default_off():
    torch.manual_seed(0)
    emb = ClassEmbedder(embed_dim=2, n_classes=5, ucg_rate=0.25)
    labels = torch.zeros(4000, dtype=torch.long)
    out = emb({"class": labels})[:, 0]
    dropped = (out == emb.embedding.weight[4]).all(-1).float().mean().item()
    assert abs(dropped - 0.25) < 0.03
    plain = ClassEmbedder(embed_dim=2, n_classes=5)       # latent-diffusion configs: never dropped
    assert torch.equal(plain({"class": labels[:50]})[:, 0], plain.embedding.weight[[0] * 50])


# ---------------------------------------------------------------------------------------
# SpatialRescaler, LDM text transformer
# ---------------------------------------------------------------------------------------
def test_spatial_rescaler():
    r = SpatialRescaler(n_stages=2, method="bilinear", multiplier=0.5, in_channels=5, out_channels=3)
    x = torch.randn(2, 5, 16, 12)
    out = r.encode(x)
    assert out.shape == (2, 3, 4, 3) and "channel_mapper.weight" in r.state_dict()
    assert torch.allclose(SpatialRescaler(n_stages=1, method="area")(x), torch.nn.functional.avg_pool2d(x, 2))


def test_x_transformer_attention_matches_explicit_reference():
    torch.manual_seed(0)
    attn = Attention(12, dim_head=4, heads=3).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)

    def heads(t):
        return t.view(2, 5, 3, 4).transpose(1, 2)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
    dots = torch.einsum("bhid,bhjd->bhij", q, k) * 0.5
    keep = mask[:, None, :, None] & mask[:, None, None, :]
    dots = dots.masked_fill(~keep, -torch.finfo(dots.dtype).max)
    ref = torch.einsum("bhij,bhjd->bhid", dots.softmax(-1), v).transpose(1, 2).reshape(2, 5, 12)
    assert torch.allclose(attn(x, mask=mask), attn.to_out(ref), atol=1e-12)


def test_bert_embedder_without_tokenizer_and_lazy_tokenizer():
    emb = BERTEmbedder(n_embed=32, n_layer=2, vocab_size=50, max_seq_len=9, use_tokenizer=False)
    keys = list(emb.state_dict())
    assert keys[:3] == ["transformer.token_emb.weight", "transformer.pos_emb.emb.weight",
                        "transformer.attn_layers.layers.0.0.weight"]
    assert "transformer.attn_layers.layers.1.1.net.0.0.weight" in keys and "transformer.to_logits.bias" in keys
    tokens = torch.randint(0, 50, (2, 9))
    z = emb.encode(tokens)
    assert z.shape == (2, 9, 32)
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 50
    assert not torch.allclose(emb(changed)[0, 0], z[0, 0])     # bidirectional encoder
    # with a tokenizer, its files are read when the model is built: a missing one fails there
    with pytest.raises(HubWeightsMissing, match="tokenizer_path"):
        BERTEmbedder(n_embed=32, n_layer=1, vocab_size=30522, tokenizer_path="/no/such/vocab")
    with torch.device("meta"):   # meta builds (key listings) read nothing
        assert BERTEmbedder(n_embed=32, n_layer=1, vocab_size=30522).tknz_fn._tokenizer is None


def test_bert_tokenizer_missing_files_error_names_what_to_provide(tmp_path):
    tok = BERTTokenizer(version=str(tmp_path / "no-such-dir"))
    with pytest.raises(HubWeightsMissing, match="vocab.txt"):
        tok("a photo")


# ---------------------------------------------------------------------------------------
# CLIP (SD v1)
# ---------------------------------------------------------------------------------------
def test_clip_builds_on_meta_without_weights(monkeypatch):
    monkeypatch.delenv(enc.RANDOM_WEIGHTS_ENV, raising=False)
    with torch.device("meta"):
        m = FrozenCLIPEmbedder(version="openai/clip-vit-large-patch14")
    sd = m.state_dict()
    assert sd["transformer.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert all(not p.requires_grad for p in m.parameters())


def test_clip_missing_weights_raise_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(enc.RANDOM_WEIGHTS_ENV, raising=False)
    with pytest.raises(HubWeightsMissing, match="no-such-model"):
        FrozenCLIPEmbedder(version=str(tmp_path / "no-such-model"))


def test_clip_random_weights_last_and_hidden_layers():
    m = FrozenCLIPEmbedder(pretrained=False)
    assert m.tokenize("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    with torch.no_grad():
        last = m.encode(["a photo of a cat", "an astronaut riding a horse"])
        m.layer, m.layer_idx = "hidden", -2
        penultimate = m.encode(["a photo of a cat", "an astronaut riding a horse"])
    assert last.shape == penultimate.shape == (2, 77, 768)
    assert not torch.allclose(last, penultimate, atol=1e-3)
    assert not torch.allclose(last[0], last[1], atol=1e-3)


def test_clip_loads_local_directory_and_released_key_layout(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    small = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=77))
    small.save_pretrained(tmp_path)
    m = FrozenCLIPEmbedder(version=str(tmp_path))
    assert torch.equal(m.transformer.final_layer_norm.weight, small.final_layer_norm.weight)
    with torch.no_grad():
        assert m.encode("a cat").shape == (1, 77, 32)
    # a released SD v1 checkpoint: `transformer.text_model.*` and a stale position_ids entry
    released = {("transformer.text_model." + k): v + 1 for k, v in m.transformer.state_dict().items()}
    released["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    m.load_state_dict(released, strict=True)
    assert torch.equal(m.transformer.final_layer_norm.weight, small.final_layer_norm.weight + 1)


# ---------------------------------------------------------------------------------------
# OpenCLIP (SD v2)
# ---------------------------------------------------------------------------------------
def test_openclip_random_weights_last_and_penultimate():
    m = FrozenOpenCLIPEmbedder(pretrained=False, layer="last")
    assert not hasattr(m.model, "visual")
    assert m.model.attn_mask is not None and "model.attn_mask" not in m.state_dict()
    texts = ["a photo of a cat", "an astronaut riding a horse"]
    with torch.no_grad():
        last = m.encode(texts)
        m.layer_idx = 1                                  # as layer="penultimate"
        penultimate = m.encode(texts)
    assert last.shape == penultimate.shape == (2, 77, 1024)
    assert not torch.allclose(last, penultimate, atol=1e-3)
    assert FrozenOpenCLIPEmbedder.LAYERS == ["last", "penultimate"]


@pytest.fixture
def tiny_openclip_arch(tmp_path):
    import open_clip
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 56},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}}
    (tmp_path / "ldm-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "ldm-test-tiny.json")
    return "ldm-test-tiny"


def test_openclip_loads_checkpoint_file(tiny_openclip_arch, tmp_path, monkeypatch):
    monkeypatch.delenv(enc.RANDOM_WEIGHTS_ENV, raising=False)
    torch.manual_seed(0)
    src = FrozenOpenCLIPEmbedder(arch=tiny_openclip_arch, pretrained=False, layer="penultimate")
    ckpt = {"state_dict": {"module." + k: v + 0.5 for k, v in src.model.state_dict().items()}}
    ckpt["state_dict"]["module.visual.proj"] = torch.zeros(3)           # vision tower: ignored
    torch.save(ckpt, tmp_path / "weights.pt")
    m = FrozenOpenCLIPEmbedder(arch=tiny_openclip_arch, version=str(tmp_path / "weights.pt"), layer="penultimate")
    for k, v in src.model.state_dict().items():
        assert torch.equal(m.model.state_dict()[k], v + 0.5), k
    with torch.no_grad():
        z = m.encode(["a cat"])
        # reference: open_clip's own text transformer minus the last block, then ln_final
        tokens = __import__("open_clip").tokenize(["a cat"])
        x = m.model.token_embedding(tokens) + m.model.positional_embedding
        for block in m.model.transformer.resblocks[:-1]:
            x = block(x, attn_mask=m.model.attn_mask)
        ref = m.model.ln_final(x)
    assert z.shape == (1, 77, 32) and torch.allclose(z, ref, atol=1e-5)
    with pytest.raises(HubWeightsMissing, match="laion2b_s32b_b79k"):
        FrozenOpenCLIPEmbedder(arch="ViT-H-14", version="laion2b_s32b_b79k")


def test_random_weights_env_flag(monkeypatch, tiny_openclip_arch):
    monkeypatch.setenv(enc.RANDOM_WEIGHTS_ENV, "1")
    m = FrozenOpenCLIPEmbedder(arch=tiny_openclip_arch)      # no weights anywhere: random, no error
    assert math.isfinite(m.encode("x").sum().item())


def test_openclip_image_embedder_and_noise_augmentation(tiny_openclip_arch):
    torch.manual_seed(0)
    emb = FrozenOpenCLIPImageEmbedder(arch=tiny_openclip_arch, pretrained=False, ucg_rate=1.0)
    keys = emb.state_dict()
    assert "model.visual.proj" in keys and "model.token_embedding.weight" in keys
    assert not any(k.startswith("model.transformer.") for k in keys)      # text transformer deleted
    img = torch.rand(2, 3, 64, 48) * 2 - 1
    z = emb(img, no_dropout=True)
    assert z.shape == (2, 16) and z.abs().sum() > 0
    emb.train()
    assert torch.count_nonzero(emb(img)) == 0                             # ucg_rate 1: all zeroed
    aug = CLIPEmbeddingNoiseAugmentation(noise_schedule_config=dict(timesteps=1000, beta_schedule="linear"),
                                         timestep_dim=16)
    x, level = torch.randn(3, 16), torch.tensor([0, 10, 999])
    z, level_emb = aug(x, noise_level=level)
    assert z.shape == x.shape and torch.allclose(level_emb, timestep_embeddings(level, 16))
    assert "data_mean" not in aug.state_dict()


def timestep_embeddings(t, dim):
    from ldm.modules.diffusionmodules.util import timestep_embedding
    return timestep_embedding(t, dim)
