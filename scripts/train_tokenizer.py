#!/usr/bin/env python
"""Train a WordPiece vocabulary (BERT's tokenizer, lower-cased) on your own captions, offline,
for the text-to-image LDMs trained from scratch (`BERTEmbedder`, e.g. configs/custom/ldm-caption-bert-*.yaml).

  # every sidecar caption <image>.txt under the image folder -> models/tokenizers/captions/vocab.txt
  python scripts/train_tokenizer.py --captions data/my_images --out models/tokenizers/captions
  # or a text file with one caption per line
  python scripts/train_tokenizer.py --captions captions.txt --out models/tokenizers/captions --vocab_size 4000

Then point the config at it (the custom configs already name models/tokenizers/captions):
  model.params.cond_stage_config.params.tokenizer_path=models/tokenizers/captions
The embedder's `vocab_size` must be at least the vocabulary written here (printed below;
the configs reserve 8192). Uses the `tokenizers` package; takes seconds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]   # BERT's, ids 0..4 as BertTokenizerFast expects


def read_captions(source: Path, ext: str = ".txt") -> list[str]:
    """Captions from a folder (every `*<ext>` file under it, recursively) or one text file (a caption per line)."""
    if source.is_dir():
        files = sorted(p for p in source.rglob(f"*{ext}") if p.is_file())
        captions = [p.read_text(encoding="utf-8").strip() for p in files]
    elif source.is_file():
        captions = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    else:
        raise SystemExit(f"train_tokenizer.py: --captions '{source}' is neither a folder nor a file")
    captions = [c for c in captions if c]
    if not captions:
        raise SystemExit(f"train_tokenizer.py: no captions found in '{source}' "
                         f"(a folder of *{ext} sidecar files, or a text file of lines)")
    return captions


def train(captions: Sequence[str], vocab_size: int = 8192, min_frequency: int = 1) -> "object":
    from tokenizers import BertWordPieceTokenizer
    tok = BertWordPieceTokenizer(lowercase=True, clean_text=True, strip_accents=True)
    tok.train_from_iterator(list(captions), vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=SPECIAL, show_progress=False)
    return tok


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, type=Path,
                   help="image folder with sidecar caption files, or a text file with one caption per line")
    p.add_argument("--out", default="models/tokenizers/captions", type=Path,
                   help="output folder (vocab.txt, tokenizer.json); the config's tokenizer_path")
    p.add_argument("--ext", default=".txt", help="caption file extension in a folder (default .txt)")
    p.add_argument("--vocab_size", type=int, default=8192, help="largest vocabulary to learn")
    p.add_argument("--min_frequency", type=int, default=1, help="keep merges seen at least this often")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Path:
    opt = parser().parse_args(argv)
    captions = read_captions(opt.captions, opt.ext)
    tok = train(captions, opt.vocab_size, opt.min_frequency)
    opt.out.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(opt.out))                        # vocab.txt
    tok.save(str(opt.out / "tokenizer.json"))
    n = tok.get_vocab_size()
    print(f"WordPiece vocabulary of {n} tokens from {len(captions)} captions written to {opt.out}/vocab.txt "
          f"(use tokenizer_path={opt.out} and vocab_size >= {n})")
    return opt.out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
