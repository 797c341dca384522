"""First-stage losses: LPIPS weights policy, discriminator, adaptive GAN weight, KL and VQ losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import LPIPSWithDiscriminator
from ldm.modules.losses.discriminator import NLayerDiscriminator, adopt_weight, hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.lpips import LPIPS, VGG16_FILE, lpips_linear_weights_path
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator
from ldm.util import instantiate_from_config


@pytest.fixture
def no_vgg_file(tmp_path, monkeypatch):
    """An empty torch hub cache: the VGG16 ImageNet weights are absent."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("LDM_LPIPS_RANDOM", raising=False)
    return tmp_path / "hub" / "checkpoints" / VGG16_FILE


def test_lpips_key_tree_matches_the_original() -> None:
    keys = LPIPS(pretrained=False).state_dict()
    assert list(keys)[:4] == ["scaling_layer.shift", "scaling_layer.scale", "net.slice1.0.weight",
                              "net.slice1.0.bias"]
    assert {"net.slice2.5.weight", "net.slice3.14.bias", "net.slice4.21.weight", "net.slice5.28.bias",
            "lin4.model.1.weight"} <= set(keys)
    assert keys["lin2.model.1.weight"].shape == (1, 256, 1, 1) and len(keys) == 2 + 26 + 5


def test_missing_vgg_file_raises_naming_the_file_at_first_use(no_vgg_file) -> None:
    lp = LPIPS()                                         # building never fails offline
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(FileNotFoundError) as err:
        lp(x, x)
    assert str(no_vgg_file) in str(err.value) and str(no_vgg_file.parent) in str(err.value)
    # a state dict that carries the trunk (a checkpoint, the golden runner) replaces the file
    lp.load_state_dict(LPIPS(pretrained=False).state_dict(), strict=True)
    assert lp(x, x).shape == (1, 1, 1, 1)


def test_missing_vgg_file_inside_the_training_loss(no_vgg_file) -> None:
    loss = instantiate_from_config({"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                                    "params": {"disc_start": 0}})
    x = torch.zeros(1, 3, 16, 16)
    post = DiagonalGaussianDistribution(torch.zeros(1, 2, 4, 4))
    with pytest.raises(FileNotFoundError, match=VGG16_FILE):
        loss(x, x, post, 0, 0, last_layer=None)


def test_random_lpips_by_env_and_meta_building(no_vgg_file, monkeypatch) -> None:
    monkeypatch.setenv("LDM_LPIPS_RANDOM", "1")
    x = torch.rand(1, 3, 16, 16)
    assert float(LPIPS()(x, x).abs().max()) == 0.0       # d(x, x) = 0
    monkeypatch.delenv("LDM_LPIPS_RANDOM")
    with torch.device("meta"):
        lp = LPIPS()
    assert lp.net.slice1[0].weight.is_meta
    assert all(not p.requires_grad for p in lp.parameters())


def test_lpips_linear_layers_come_from_the_lpips_package(no_vgg_file) -> None:
    path = lpips_linear_weights_path()
    if path is None or not path.exists():
        pytest.skip("lpips package not installed")
    ref = torch.load(path, map_location="cpu", weights_only=True)
    lp = LPIPS()
    assert torch.equal(lp.lin3.model[1].weight, ref["lin3.model.1.weight"])


def test_discriminator_layout_and_gan_losses() -> None:
    d = NLayerDiscriminator(input_nc=3, ndf=16, n_layers=2)
    assert [type(m).__name__ for m in d.main] == ["Conv2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU",
                                                   "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d"]
    assert d.main[2].bias is None and d.main[5].weight.shape == (64, 32, 4, 4)
    assert "main.3.running_mean" in d.state_dict()
    assert "main.3.loc" in NLayerDiscriminator(ndf=8, n_layers=2, use_actnorm=True).state_dict()
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert float(vanilla_d_loss(real, fake)) == pytest.approx(
        0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean()).item())
    assert adopt_weight(1.0, 4, threshold=5) == 0.0 and adopt_weight(1.0, 5, threshold=5) == 1.0


def _kl_setup(**kw):
    torch.manual_seed(0)
    loss = LPIPSWithDiscriminator(disc_start=5, disc_num_layers=1, perceptual_weights="random", **kw).eval()
    with torch.no_grad():   # DCGAN init gives tiny discriminator gradients (the ratio would hit its 1e4 clamp)
        for p in loss.discriminator.parameters():
            if p.ndim == 4:
                p.normal_(0.0, p[0].numel() ** -0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    feat = torch.randn(2, 4, 16, 16)
    w = (0.1 * torch.randn(3, 4, 3, 3)).requires_grad_(True)
    post = DiagonalGaussianDistribution(torch.randn(2, 4, 4, 4))
    return loss, x, feat, w, post


def test_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    loss, x, feat, w, post = _kl_setup(disc_weight=0.5)
    rec = F.conv2d(feat, w, padding=1)
    total, log = loss(x, rec, post, 0, 10, last_layer=w)
    nll = (torch.abs(x - rec) + loss.perceptual_loss(x, rec)).sum() / 2        # logvar = 0
    g = -loss.discriminator(rec).mean()
    gn, = torch.autograd.grad(nll, w, retain_graph=True)
    gg, = torch.autograd.grad(g, w, retain_graph=True)
    expected = 0.5 * gn.norm() / (gg.norm() + 1e-4)
    assert 1e-3 < float(expected) < 0.5e4                                   # not clamped
    assert torch.allclose(log["train/d_weight"], expected, rtol=1e-5)
    kl = post.kl().sum() / 2
    assert torch.allclose(total, nll + 1.0 * kl + expected * g, rtol=1e-5)
    # before disc_start the GAN term is gated off but the weight is still computed
    total0, log0 = loss(x, rec, post, 0, 4, last_layer=w)
    assert float(log0["train/disc_factor"]) == 0.0 and torch.allclose(total0, nll + kl, rtol=1e-6)


def test_kl_loss_discriminator_step_and_no_grad_evaluation() -> None:
    loss, x, feat, w, post = _kl_setup(disc_loss="vanilla")
    rec = F.conv2d(feat, w, padding=1)
    d_loss, log = loss(x, rec, post, 1, 10, last_layer=w)
    expected = vanilla_d_loss(loss.discriminator(x), loss.discriminator(rec))
    assert torch.allclose(d_loss, expected) and set(log) == {"train/disc_loss", "train/logits_real",
                                                             "train/logits_fake"}
    with torch.no_grad():                                                # validation: no autograd -> weight 0
        _, log_val = loss(x, rec, post, 0, 10, last_layer=w, split="val")
    assert float(log_val["val/d_weight"]) == 0.0 and "val/rec_loss" in log_val
    loss.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="adaptive"):
        loss(x, rec, post, 0, 10, last_layer=w)


def test_vq_loss_terms_and_perplexity() -> None:
    torch.manual_seed(0)
    loss = VQLPIPSWithDiscriminator(disc_start=0, codebook_weight=2.0, disc_num_layers=1, disc_ndf=8,
                                    perceptual_weight=0.0, pixel_loss="l2", n_classes=4,
                                    perceptual_weights="random").eval()
    x = torch.rand(2, 3, 16, 16)
    w = (0.1 * torch.randn(3, 4, 3, 3)).requires_grad_(True)
    rec = F.conv2d(torch.randn(2, 4, 16, 16), w, padding=1)
    cb = torch.tensor([0.3])
    total, log = loss(cb, x, rec, 0, 0, last_layer=w, predicted_indices=torch.tensor([0, 0, 1, 3]))
    nll = ((x - rec) ** 2).mean()
    g = -loss.discriminator(rec).mean()
    assert torch.allclose(total, nll + log["train/d_weight"] * g + 2.0 * 0.3, rtol=1e-5)
    p = torch.tensor([0.5, 0.25, 0.0, 0.25])
    expected_perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
    assert torch.allclose(log["train/perplexity"], expected_perplexity) and int(log["train/cluster_usage"]) == 3


def test_vgg_weights_load_from_the_torchvision_cache_file(no_vgg_file) -> None:
    torch.manual_seed(0)
    src = LPIPS(pretrained=False).net
    # torchvision's layout: features.<index>.* (+ classifier.*, ignored)
    sd = {f"features.{k.split('.', 1)[1]}": v for k, v in src.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(1)
    no_vgg_file.parent.mkdir(parents=True)
    torch.save(sd, no_vgg_file)
    lp = LPIPS()
    assert torch.equal(getattr(lp.net.slice4, "19").weight, getattr(src.slice4, "19").weight)
    x = torch.rand(1, 3, 16, 16)
    assert lp(x, x.flip(-1)).item() > 0
