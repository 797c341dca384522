"""FD-DINOv2, CMMD and CLIP score: closed-form checks against direct computations, a tiny
trained CLIP for matching vs shuffled captions, missing weights reported before sampling, and
the JSON recording the feature network and weights hash of every number (issue 15.4), plus
the autoencoder evaluation writing its JSON from a config with a `data` section (issue 11.5)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.eval.feature_nets import ClipFeatures, DinoV2Features, FeatureWeightsNotFound
from ldm.eval.modern_metrics import clip_score, cmmd, fd_from_features
from ldm.eval.pipeline import EvalSettings, run_autoencoder, run_generative

TINY_VIT = dict(patch_size=14, embed_dim=32, depth=1, num_heads=2, init_values=1e-5)
TINY_CLIP = dict(embed_dim=32, vision_cfg=dict(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
                 text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _images(n, seed, size=32):
    rs = np.random.RandomState(seed)
    base = rs.randint(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return np.stack([np.kron(b, np.ones((size // 4, size // 4, 1), np.uint8)) for b in base])


def test_fd_dinov2_self_zero_and_equals_direct_computation():
    net = DinoV2Features(random_weights=True, arch=TINY_VIT)
    a, b = net(_images(40, 0))["dinov2"], net(_images(40, 1))["dinov2"]
    assert a.shape == (40, 32)
    # the extractor = the ViT on TF-bilinear 224 px, ImageNet-normalised inputs
    from ldm.eval.feature_nets import IMAGENET_MEAN, IMAGENET_STD, resize_normalise
    x = torch.from_numpy(_images(40, 0)[:6]).permute(0, 3, 1, 2)
    with torch.no_grad():
        direct = net.model(resize_normalise(x, 224, IMAGENET_MEAN, IMAGENET_STD)).double().numpy()
    assert np.abs(direct - a[:6]).max() < 1e-5
    assert abs(fd_from_features(a, a)) < 1e-8
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r1 = scipy.linalg.sqrtm(s1).real   # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), eigenvalues of a PSD matrix
    ev = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    fd = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum()
    print(f"METRIC FD-DINOv2 (random tiny ViT) self = {fd_from_features(a, a):.3g}, "
          f"A vs B = {fd_from_features(a, b):.6f}, direct = {fd:.6f}")
    assert fd_from_features(a, b) == pytest.approx(fd, rel=1e-6)


def test_cmmd_self_zero_and_equals_direct_computation():
    net = ClipFeatures(random_weights=True, arch=TINY_CLIP)
    a, b = net(_images(30, 2))["clip_image"], net(_images(20, 3))["clip_image"]
    assert np.allclose(np.linalg.norm(a, axis=1), 1)
    assert cmmd(a, a) == 0.0 or abs(cmmd(a, a)) < 1e-12

    def k(x, y):
        return np.exp(-np.sum((x - y) ** 2) / (2 * 10.0 ** 2))

    direct = 1000 * (np.mean([k(x, y) for x in a for y in a]) + np.mean([k(x, y) for x in b for y in b])
                     - 2 * np.mean([k(x, y) for x in a for y in b]))
    print(f"METRIC CMMD (random tiny CLIP) self = {cmmd(a, a):.3g}, A vs B = {cmmd(a, b):.6f}, direct = {direct:.6f}")
    assert cmmd(a, b) == pytest.approx(direct, rel=1e-9)
    assert cmmd(a, b) > 0


def _color_batch(rs, n):
    names = list(COLORS)
    idx = rs.randint(0, len(names), n)
    img = np.stack([np.full((32, 32, 3), COLORS[names[i]]) for i in idx]) + rs.randint(-25, 26, (n, 32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8), [f"a {names[i]} square" for i in idx]


def test_clip_score_matching_beats_shuffled_with_a_tiny_trained_clip(tmp_path):
    """A tiny open_clip CLIP trained for a few seconds on solid-colour squares with their colour
    names, saved to a file and read back by ClipFeatures (weights path + hash recorded)."""
    import open_clip

    from ldm.eval.feature_nets import resize_normalise
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CLIP)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    rs = np.random.RandomState(0)
    for _ in range(60):
        img, caps = _color_batch(rs, 32)
        x = resize_normalise(torch.from_numpy(img).permute(0, 3, 1, 2), 32, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        fi = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(tok(caps)), dim=-1)
        logits = model.logit_scale.exp() * fi @ ft.T
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float)
        target = same / same.sum(1, keepdim=True)
        loss = -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "toy_clip.pt"
    torch.save(model.state_dict(), path)
    net = ClipFeatures(weights_path=str(path), arch=TINY_CLIP)
    assert net.provenance["sha256"] and net.provenance["weights"] == str(path)
    img, caps = _color_batch(np.random.RandomState(1), 64)
    feats = net(img)["clip_image"]
    matching = clip_score(feats, net.text(caps))["clip_score"]
    shuffled = clip_score(feats, net.text(list(np.random.RandomState(2).permutation(caps))))["clip_score"]
    print(f"METRIC CLIP score (tiny trained toy CLIP, 64 images): matching = {matching:.2f}, shuffled = {shuffled:.2f}")
    assert matching > shuffled + 5


class TinyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 8):
        self.images = _images(n, 5)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": (self.images[i] / 127.5 - 1.0).astype(np.float32)}


DATA = {"target": f"{__name__}.TinyData", "params": {"n": 8}}


def _settings(tmp_path, **kw):
    base = dict(outdir=str(tmp_path / "s"), n=8, batch=4, seed=0, reference_data=DATA, split="train",
                cache_dir=str(tmp_path / "cache"), device="cpu", progress=False, row="toy")
    base.update(kw)
    return EvalSettings(**base)


def _fake(x_T, labels):
    x = torch.tanh(x_T.mean(1, keepdim=True)).repeat(1, 3, 1, 1)
    return torch.nn.functional.interpolate(x, size=(32, 32), mode="nearest")


def test_missing_weights_fail_before_any_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nohub"))
    monkeypatch.delenv("LDM_DINOV2_WEIGHTS", raising=False)
    monkeypatch.delenv("LDM_CLIP_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "nohub" / "hub"))  # restored after the test
    calls = []

    def spy(x_T, labels):
        calls.append(1)
        return _fake(x_T, labels)

    for metric, name in (("fd_dinov2", "dinov2_vitl14_pretrain.pth"), ("cmmd", "open_clip_pytorch_model.bin")):
        with pytest.raises(FeatureWeightsNotFound, match=name):
            run_generative(_settings(tmp_path, metrics=[metric]), sample_fn=spy, shape=(3, 8, 8))
    with pytest.raises(ValueError, match="--clip-prompts"):
        run_generative(_settings(tmp_path, metrics=["clip_score"], random_features=True, clip_arch=TINY_CLIP),
                       sample_fn=spy, shape=(3, 8, 8))
    assert not calls and not (tmp_path / "s").exists()


def test_json_records_network_and_hash_per_metric(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\na blue square\n")
    s = _settings(tmp_path, metrics=["sfid", "fd_dinov2", "cmmd", "clip_score"], n=6, random_inception=True,
                  random_features=True, dinov2_arch=TINY_VIT, clip_arch=TINY_CLIP, clip_prompts=str(prompts))
    res = run_generative(s, sample_fn=_fake, shape=(3, 8, 8), protocol={"sampler": "fake"})
    m = res["metrics"]
    assert np.isfinite([m["sfid"], m["fd_dinov2"], m["cmmd"], m["clip_score"]]).all() and m["cmmd"] > 0
    saved = json.loads((tmp_path / "s" / "eval_results.json").read_text())
    nets = saved["protocol"]["feature_networks"]
    assert nets["fd_dinov2"]["network"].startswith("DINOv2") and nets["cmmd"]["network"].startswith("open_clip")
    assert nets["sfid"]["weights"] == "RANDOM" and nets["clip_score"]["weights"] == "RANDOM"
    assert "mixed_6/conv" in nets["sfid"]["layer"]
    out = capsys.readouterr().out
    assert "| toy [RANDOM-WEIGHT networks: not comparable] |" in out and "FD-DINOv2" in out
    # second run: the reference features come from the per-split cache
    caches = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(caches) == 3   # one per feature network (Inception spatial, DINOv2, CLIP)
    res2 = run_generative(_settings(tmp_path, **{**s.__dict__, "skip_sampling": True}))
    assert res2["metrics"]["cmmd"] == m["cmmd"]


class Shift:
    def encode(self, x):
        return x

    def decode(self, z):
        return z + 4 / 127.5


def test_autoencoder_json_from_a_config_with_a_data_section(tmp_path, capsys):
    """Issue 11.5: the config's `data` section (a DictConfig) used to crash the JSON writer."""
    from omegaconf import OmegaConf
    cfg = tmp_path / "ae.yaml"
    OmegaConf.save({"model": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {}},
                    "data": {"target": "x", "params": {"validation": DATA}}}, cfg)
    s = _settings(tmp_path, task="autoencoder", config=str(cfg), reference_data=None, split="validation",
                  metrics=["psnr", "ssim"], n=None)
    res = run_autoencoder(s, model=Shift())
    saved = json.loads((tmp_path / "s" / "eval_results.json").read_text())
    assert 30 < saved["metrics"]["psnr"]["mean"] < 40   # +4 grey levels, clipped at 255
    assert saved["dataset"]["config"]["params"]["validation"]["target"].endswith("TinyData")
    assert "| toy | 3" in capsys.readouterr().out and res["json_path"]


def test_sfid_features_are_mixed6_branch1x1_first_7_channels():
    from ldm.eval.features import SPATIAL, InceptionFeatures, InceptionSpatialFeatures
    net = InceptionSpatialFeatures(random_weights=True)
    x = torch.from_numpy(_images(3, 7)).permute(0, 3, 1, 2).contiguous()
    f = net(x)[SPATIAL]
    assert f.shape == (3, 17 * 17 * 7)
    grabbed = []
    base = InceptionFeatures(random_weights=True).model
    h = base.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: grabbed.append(o))
    with torch.no_grad():
        base(x)
    h.remove()
    assert np.allclose(grabbed[0][:, :7].permute(0, 2, 3, 1).reshape(3, -1).double().numpy(), f)


def test_cli_missing_dinov2_weights_is_one_message_before_the_model_loads(tmp_path, monkeypatch):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import evaluate
    monkeypatch.delenv("LDM_DINOV2_WEIGHTS", raising=False)
    # the checkpoint does not even exist: the weights check comes first
    with pytest.raises(SystemExit, match="dinov2_vitl14_pretrain.pth") as e:
        evaluate.main(["--config", "configs/ldm/celebahq.yaml", "--ckpt", str(tmp_path / "none.ckpt"), "--n", "4",
                       "--metrics", "fd_dinov2", "--dinov2-weights", str(tmp_path / "missing.pth"),
                       "--outdir", str(tmp_path / "o"), "--device", "cpu"])
    assert "given explicitly" in str(e.value) and not (tmp_path / "o").exists()
