"""NoisyLatentImageClassifier trains from its config through main.py, and classifier-guided DDIM
sampling (score_corrector=ClassifierGuidance) raises the target class's log-probability."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main
from conftest import ROOT
from ldm.models.diffusion.classifier import ClassifierGuidance, NoisyLatentImageClassifier
from ldm.models.diffusion.ddim import DDIMSampler, model_denoiser

pytestmark = pytest.mark.slow
CONFIG = ROOT / "configs" / "classifier" / "digits_noisy_latent_classifier.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("logs")
    torch.manual_seed(0)
    assert main.main(["--base", str(CONFIG), "-t", "-l", str(logs), "-n", "clf", "--seed", "0",
                      "data.params.batch_size=16", "lightning.trainer.max_steps=60", "model.base_learning_rate=1.0e-3",
                      "lightning.trainer.val_check_interval=30", "lightning.trainer.limit_val_batches=1",
                      "lightning.trainer.log_every_n_steps=10"]) == 0
    return next(logs.glob("*_clf")) / "checkpoints" / "last.ckpt"


def test_classifier_config_trains(trained):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 60
    cfg = OmegaConf.load(CONFIG).model
    fresh = NoisyLatentImageClassifier(**cfg.params)
    sd = ckpt["state_dict"]
    # the classifier learned; the diffusion model stayed frozen (only the classifier is optimised)
    assert any(not torch.equal(sd[k], v) for k, v in fresh.model.state_dict(prefix="model.").items())
    assert len(ckpt["optimizer_states"][0]["state"]) == len(list(fresh.model.parameters()))
    assert not any(p.requires_grad for p in fresh.diffusion_model.parameters())


class Recording(ClassifierGuidance):
    """ClassifierGuidance that records log p(y | x_t) of the latents the sampler visits."""

    def __init__(self, classifier, scale):
        super().__init__(classifier, scale)
        self.seen = []

    def modify_score(self, model, e_t, x, t, c, y=None, **kwargs):
        with torch.no_grad():
            self.seen.append(self.log_prob(x, t, y).mean().item())
        return super().modify_score(model, e_t, x, t, c, y=y, **kwargs)


def test_classifier_guidance_moves_samples_toward_the_class(trained, capsys):
    cfg = OmegaConf.load(CONFIG).model
    clf = NoisyLatentImageClassifier(**cfg.params)
    clf.load_state_dict(torch.load(trained, map_location="cpu", weights_only=True)["state_dict"])
    clf.eval()
    ldm = clf.diffusion_model
    y = torch.tensor([3] * 16)
    with torch.no_grad():
        c = ldm.get_learned_conditioning({"class_label": y})
        x_T = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        runs = {}
        for name, scale in (("unguided", 0.0), ("guided", 10.0)):
            corrector = Recording(clf, scale)
            z, _ = DDIMSampler(ldm).sample(10, 16, (4, 8, 8), conditioning=c, x_T=x_T, verbose=False,
                                           score_corrector=corrector, corrector_kwargs={"y": y})
            final = corrector.log_prob(z, torch.zeros(16, dtype=torch.long), y).mean().item()
            runs[name] = (sum(corrector.seen[1:]) / len(corrector.seen[1:]), final)
    with capsys.disabled():
        print("\nclassifier log p(y=3 | z_t), mean over the DDIM steps visited / at the final z_0: "
              + ", ".join(f"{k} {a:.3f} / {b:.3f}" for k, (a, b) in runs.items()) + " (guidance scale 10)")
    # The 60-step classifier is weak (loss ~ln 10), so how far whole samples move depends on the run;
    # what must hold exactly: the corrected eps is eps - s sqrt(1 - abar_t) grad log p(y | x_t), so a
    # DDIM step's x0 estimate moves up the classifier's log-probability.
    x, t = x_T[:4], torch.tensor([500] * 4)
    den = model_denoiser(ldm)
    guided = model_denoiser(ldm, score_corrector=ClassifierGuidance(clf, 10.0), corrector_kwargs={"y": y[:4]})
    with torch.no_grad():
        eps, eps_guided = den(x, t, c[:4]).eps, guided(x, t, c[:4]).eps
    with torch.enable_grad():
        x_in = x.clone().requires_grad_(True)
        grad = torch.autograd.grad(ClassifierGuidance(clf).log_prob(x_in, t, y[:4]).sum(), x_in)[0]
    abar = ldm.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps_guided, eps - 10.0 * (1 - abar).sqrt() * grad, rtol=1e-5, atol=1e-6)
    x0_shift = -(1 - abar).sqrt() / abar.sqrt() * (eps_guided - eps)        # DDIM Eq. 12's x0_hat
    assert float((x0_shift * grad).sum()) > 0 and float(grad.abs().max()) > 0
    with pytest.raises(ValueError, match="target classes"):
        ClassifierGuidance(clf).modify_score(ldm, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8),
                                             torch.zeros(1).long(), None)
