"""Small pieces of the own-data workflow: the folder dataset's keys and caption dropout, the
ImageLogger's evaluation counter (a forward hook that must not change outputs), the
WordPiece vocabulary command."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ldm.data.base import ImageFolderDataset
from ldm.training.callbacks import ImageLogger, _EvalProgress


def test_folder_dataset_keys_and_caption_dropout(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f" caption {i}\n")
    ds = ImageFolderDataset(str(tmp_path), size=16, caption_ext=".txt", image_key="jpg", caption_key="txt")
    item = ds[1]
    assert item["jpg"].shape == (16, 16, 3) and item["txt"] == "caption 1" and "image" not in item
    assert np.allclose(item["jpg"], 40 / 127.5 - 1)
    dropped = ImageFolderDataset(str(tmp_path), caption_ext=".txt", caption_dropout=1.0)
    assert [dropped[i]["caption"] for i in range(3)] == ["", "", ""]


def test_eval_counter_counts_and_leaves_outputs_alone():
    net = torch.nn.Linear(3, 2)
    owner = ImageLogger(batch_frequency=1, max_images=1)
    x = torch.randn(4, 3)
    with _EvalProgress(net, "test", delay=0.0, owner=owner):   # delay 0: the bar is shown (tqdm returns True)
        outs = [net(x) for _ in range(3)]
    assert all(isinstance(o, torch.Tensor) and torch.equal(o, net(x)) for o in outs)
    assert owner.unet_evals == 3 and not net._forward_hooks


def test_train_tokenizer_from_a_caption_file(tmp_path):
    import sys

    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_tokenizer import main

    from ldm.modules.encoders.modules import BERTEmbedder
    (tmp_path / "caps.txt").write_text("a red cube\na blue sphere on a red table\n\n")
    out = main(["--captions", str(tmp_path / "caps.txt"), "--out", str(tmp_path / "tok"), "--vocab_size", "200"])
    vocab = (out / "vocab.txt").read_text().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and "red" in vocab
    emb = BERTEmbedder(n_embed=8, n_layer=1, vocab_size=len(vocab), max_seq_len=6, tokenizer_path=str(out))
    tokens = emb.tknz_fn(["a red cube", "sphere"])
    assert tokens.shape == (2, 6) and tokens[0, 0] == 2 and tokens[1, 3] == 0      # [CLS] ... [PAD]
    assert 1 not in tokens[0].tolist()                                           # no [UNK] for known words
    import pytest
    with pytest.raises(ValueError, match=r"has \d+ tokens but vocab_size is 5"):
        BERTEmbedder(n_embed=8, n_layer=1, vocab_size=5, tokenizer_path=str(out))
