"""configs/recipes/*.yaml: each overlay, merged after the quickstart config exactly as
`main.py -b base.yaml recipe.yaml` merges it, names only keys that exist: the model builds (and
takes a training step) with the recipe switched on, callbacks instantiate, trainer flags are
pl.Trainer arguments, dataset / data-module params bind to their classes. A recipe whose key
is unknown on this tree fails here, loudly; a new overlay file is picked up automatically."""
from __future__ import annotations

import inspect

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from ldm.training.config import load_configs, load_yaml
from ldm.util import get_obj_from_str, instantiate_from_config

torch.set_num_threads(1)
BASE = ROOT / "configs" / "quickstart" / "ldm_digits.yaml"
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
EXPECTED = {"min_snr", "v_objective", "zero_snr", "offset_noise", "input_perturbation", "ucg", "lora",
            "posthoc_ema", "bucketing", "cached_latents"}


def test_every_recipe_has_an_overlay_and_a_readme_entry():
    names = {p.stem for p in RECIPES}
    assert EXPECTED <= names
    readme = (ROOT / "README.md").read_text()
    assert "## Modern recipes" in readme
    section = readme.split("## Modern recipes", 1)[1].split("\n## ", 1)[0]
    for name in names:
        assert f"configs/recipes/{name}.yaml" in section, f"README 'Modern recipes' does not list {name}.yaml"


def bind(target: str, params, where: str) -> None:
    """Raise on a key the class does not take (the overlay's own keys)."""
    cls = get_obj_from_str(target)
    try:
        inspect.signature(cls).bind_partial(**OmegaConf.to_container(params or {}, resolve=True))
    except TypeError as e:
        raise AssertionError(f"{where}: {target} does not take {sorted(params)}: {e}") from e


def digits_batch():
    cfg = OmegaConf.load(BASE)
    ds = instantiate_from_config(cfg.data.params.validation)
    items = [ds[i] for i in range(2)]
    return {"image": torch.stack([torch.as_tensor(it["image"]) for it in items]),
            "class_label": torch.tensor([it["class_label"] for it in items])}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_overlay_merges_and_builds(recipe):
    overlay = load_yaml(str(recipe))
    unknown = set(overlay) - {"model", "data", "lightning"}
    assert not unknown, f"{recipe.name}: unknown top-level sections {unknown}"
    config, lightning, _ = load_configs([str(BASE), str(recipe)], [])
    if "model" in overlay:
        def plain(v):
            return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for key, value in overlay.model.params.items():   # the recipe's value survives the merge
            assert plain(config.model.params[key]) == plain(value), f"{recipe.name}: model.params.{key}"
        torch.manual_seed(0)
        model = instantiate_from_config(config.model)   # TypeError on an unknown key
        p = overlay.model.params
        if "parameterization" in p:
            assert model.parameterization == p.parameterization
        if p.get("rescale_betas_zero_snr"):
            assert float(model.alphas_cumprod[-1]) == 0.0
        if "snr_gamma" in p:
            assert model.loss_weighting is not None
        if "lora_config" in p:
            trainable = [n for n, q in model.named_parameters() if q.requires_grad]
            assert trainable and all("lora" in n for n in trainable)
        model.train()
        model.scale_by_std = False   # no first-batch std estimate in a bare step
        loss, _ = model.shared_step(digits_batch())
        assert torch.isfinite(loss)
    for name in overlay.get("lightning", {}).get("callbacks", {}) or {}:
        instantiate_from_config(lightning.callbacks[name])
    trainer_args = set(inspect.signature(__import__("pytorch_lightning").Trainer).parameters)
    for key in overlay.get("lightning", {}).get("trainer", {}) or {}:
        assert key in trainer_args, f"{recipe.name}: lightning.trainer.{key} is not a pl.Trainer argument"
    data = overlay.get("data")
    if data is not None:
        if "target" in data:
            bind(data.target, config.data.params, f"{recipe.name}: data")
        for split, node in (data.get("params") or {}).items():
            if OmegaConf.is_dict(node) and "target" in node:
                bind(node.target, node.get("params"), f"{recipe.name}: data.params.{split}")
