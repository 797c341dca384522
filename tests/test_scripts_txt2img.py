"""scripts/txt2img.py end to end on tiny random-weight checkpoints (SD v1 / v2-v / LDM text2img)."""
from __future__ import annotations

import pytest

from test_scripts_common import image_array, png_bytes, pngs, script, tiny  # noqa: F401

SD1 = "configs/stable-diffusion/v1-inference.yaml"
SD2V = "configs/stable-diffusion/v2-inference-v.yaml"


def run(cfg, ckpt, out, *extra):
    return script("txt2img").main(["--config", str(cfg), "--ckpt", str(ckpt), "--outdir", str(out), "--H", "64",
                                   "--W", "64", "--steps", "3", "--n_samples", "2", "--device", "cpu", *extra])


def test_sd1_same_seed_same_images_ckpt_and_safetensors(tiny, tmp_path):
    cfg, ckpt = tiny(SD1, "ckpt")
    a = run(cfg, ckpt, tmp_path / "a", "--seed", "1")
    b = run(cfg, tiny(SD1, "safetensors")[1], tmp_path / "b", "--seed", "1")
    c = run(cfg, ckpt, tmp_path / "c", "--seed", "2")
    assert [p.name for p in a] == ["00000.png", "00001.png"]
    assert (tmp_path / "a" / "grid-0000.png").is_file()
    assert image_array(a[0]).shape == (64, 64, 3)
    assert png_bytes(a) == png_bytes(b)             # same seed, same weights in either format: same bytes
    assert png_bytes(a) != png_bytes(c)
    assert png_bytes(a[:1]) != png_bytes(a[1:])      # the two samples of a batch differ


def test_prompts_from_file_guidance_and_convolutional_size(tiny, tmp_path):
    cfg, ckpt = tiny(SD1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na green tree\n")
    out = script("txt2img").main(["--config", str(cfg), "--ckpt", str(ckpt), "--outdir", str(tmp_path / "o"),
                                  "--from-file", str(prompts), "--n_samples", "2", "--steps", "2", "--scale", "5",
                                  "--H", "128", "--W", "192", "--sampler", "plms", "--n_iter", "2"])
    assert len(out) == 6 and image_array(out[0]).shape == (128, 192, 3)     # 2x3 times the training size
    assert out[-1].name == "00005.png" and png_bytes(out[:3]) != png_bytes(out[3:])
    # the prompt matters: same seed, other prompt -> other image
    a = run(cfg, ckpt, tmp_path / "p1", "--prompt", "a red cube", "--n_samples", "1")
    b = run(cfg, ckpt, tmp_path / "p2", "--prompt", "a cat", "--n_samples", "1")
    assert png_bytes(a) != png_bytes(b)


def test_sd2_v_dpm_bf16_and_fp16_fallback(tiny, tmp_path):
    cfg, ckpt = tiny(SD2V, "safetensors")
    a = run(cfg, ckpt, tmp_path / "a", "--sampler", "dpm", "--precision", "bf16", "--fixed_code")
    assert len(pngs(tmp_path / "a" / "samples")) == 2
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        b = run(cfg, ckpt, tmp_path / "b", "--sampler", "ddim", "--eta", "0.5", "--precision", "fp16")
    c = run(cfg, ckpt, tmp_path / "c", "--sampler", "ddim", "--eta", "0.5")
    assert png_bytes(b) == png_bytes(c) and png_bytes(a) != png_bytes(c)


def test_ldm_text2img_with_a_local_bert_vocabulary(tiny, tmp_path, monkeypatch):
    from transformers import BertTokenizerFast

    from ldm.modules.encoders import modules
    vocab = tmp_path / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)] + \
        [f"w{i}" for i in range(1000)]
    vocab.write_text("\n".join(words))
    tok = BertTokenizerFast(vocab_file=str(vocab))
    monkeypatch.setattr(modules.BERTTokenizer, "tokenizer", property(lambda self: tok))
    cfg, ckpt = tiny("configs/ldm/txt2img-1p4B.yaml")
    a = run(cfg, ckpt, tmp_path / "a", "--prompt", "a cake", "--scale", "3")
    b = run(cfg, ckpt, tmp_path / "b", "--prompt", "a cake", "--scale", "3")
    assert len(a) == 2 and png_bytes(a) == png_bytes(b)


def test_bad_inputs_give_one_clear_message(tiny, tmp_path):
    cfg, ckpt = tiny(SD1)
    with pytest.raises(SystemExit, match=r"checkpoint not found: '.*missing\.ckpt'"):
        run(cfg, tmp_path / "missing.ckpt", tmp_path / "o")
    with pytest.raises(SystemExit, match=r"prompt file not found: '.*nope\.txt'"):
        run(cfg, ckpt, tmp_path / "o", "--from-file", str(tmp_path / "nope.txt"))
    with pytest.raises(SystemExit, match=r"64x72 must be positive multiples of the downsampling factor 64"):
        run(cfg, ckpt, tmp_path / "o", "--W", "72")
    with pytest.raises(SystemExit, match=r"not a text-conditional model"):
        run(*tiny("configs/ldm/cin256.yaml"), tmp_path / "o")
    with pytest.raises(SystemExit, match=r"needs --eta 0"):
        run(cfg, ckpt, tmp_path / "o", "--sampler", "plms", "--eta", "1")
    other, _ = tiny("configs/stable-diffusion/v2-inpainting.yaml")
    mismatch = (r"shape mismatch\(es\) for LatentInpaintDiffusion:\n  "
                r"model.diffusion_model.input_blocks.0.0.weight: checkpoint \(32, 4, 3, 3\) vs model \(32, 9, 3, 3\)")
    with pytest.raises(SystemExit, match=mismatch):
        run(other, ckpt, tmp_path / "o")                     # strict loading: a clear key report


def test_pickled_checkpoint_needs_unsafe_pickle(tiny, tmp_path):
    import argparse

    import torch
    cfg, ckpt = tiny(SD1)
    pickled = tmp_path / "pickled.ckpt"
    data = torch.load(ckpt, weights_only=True)
    data["hparams"] = argparse.Namespace(lr=1.0)      # as old Lightning checkpoints: needs full unpickling
    torch.save(data, pickled)
    with pytest.raises(SystemExit, match=r"pickles objects other than tensors.*--unsafe_pickle"):
        run(cfg, pickled, tmp_path / "a", "--n_samples", "1")
    assert len(run(cfg, pickled, tmp_path / "b", "--n_samples", "1", "--unsafe_pickle")) == 1


def test_help_and_process_exit(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    r = subprocess.run([sys.executable, str(ROOT / "scripts/txt2img.py"), "--ckpt", str(tmp_path / "x.ckpt"),
                        "--config", str(ROOT / SD1)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("x.ckpt'. Download the weights and put them there, or pass --ckpt with "
                                     "the right path")
    with pytest.raises(SystemExit) as e:
        script("txt2img").main(["--help"])
    assert e.value.code == 0
