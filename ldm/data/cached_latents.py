"""A dataset of first-stage latents cached to disk by `scripts/cache_latents.py`.

Training on it skips the first-stage encoder: each item carries `latent` (the encoding before
`scale_factor`: the KL posterior mean, the VQ pre-quantisation map, or a fixed sample) and,
for a KL first stage cached as a posterior, `latent_logvar`; `LatentDiffusion.get_input` then
samples z = scale_factor * (mean + std * eps) with the same random draw it would make after
encoding. The conditioning inputs of the source dataset (class labels, captions, ...) are kept
under their own keys, so the conditioning stage runs as usual.

    data:
      params:
        train:
          target: ldm.data.cached_latents.CachedLatents
          params: {root: data/latents/celebahq-train}

Layout of `root`: `index.json` ({"version": 1, "n": N, "shards": [{"file", "n"}, ...],
"latent_shape", "kind": "posterior" | "tensor" | "sample", "first_stage", ...}) and
`shard-XXXXX.safetensors` files holding `latent` (n, C, h, w), optional `latent_logvar`,
tensor-valued conditioning (n, ...), and string-valued conditioning as a JSON list in the
file's metadata (`strings` -> {key: [...]}). With `--text`, `uncond.safetensors` holds the text
encoder's output for the empty prompt, returned with every item as `cached_uncond` (ucg_rate drops to it).
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

INDEX = "index.json"
UNCOND = "uncond.safetensors"
FORMAT_VERSION = 1


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


class CachedLatents(Dataset):
    """Items {latent, [latent_logvar], conditioning keys...} from a cache directory (float32 latents)."""

    def __init__(self, root: Union[str, Path], keys: Optional[Sequence[str]] = None):
        # root: the directory scripts/cache_latents.py wrote
        # keys: the item keys to return (default: all stored ones)
        self.root = Path(root)
        index_path = self.root / INDEX
        if not index_path.exists():
            raise FileNotFoundError(f"no latent cache at {self.root} ({INDEX} missing); "
                                    "write one with scripts/cache_latents.py")
        self.index = json.loads(index_path.read_text())
        if self.index.get("version") != FORMAT_VERSION:
            raise ValueError(f"{index_path}: cache format version {self.index.get('version')}, "
                             f"expected {FORMAT_VERSION}")
        self.shards = [s["file"] for s in self.index["shards"]]
        self.offsets = [0]
        for s in self.index["shards"]:
            self.offsets.append(self.offsets[-1] + int(s["n"]))
        self.keys = list(keys) if keys is not None else None
        self._open: dict[int, Any] = {}
        self._strings: dict[int, dict[str, list]] = {}
        self.uncond: dict[str, torch.Tensor] = {}
        if (self.root / UNCOND).exists():
            from safetensors.torch import load_file
            self.uncond = {k: v.float() for k, v in load_file(str(self.root / UNCOND)).items()
                           if self.keys is None or k in self.keys}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict[str, Any]:   # file handles are not sent to worker processes
        state = dict(self.__dict__)
        state["_open"], state["_strings"] = {}, {}
        return state

    def _shard(self, i: int) -> Any:
        if i not in self._open:
            from safetensors import safe_open
            handle = safe_open(str(self.root / self.shards[i]), framework="pt")
            self._open[i] = handle
            self._strings[i] = json.loads((handle.metadata() or {}).get("strings", "{}"))
        return self._open[i]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        s = bisect.bisect_right(self.offsets, idx) - 1
        j = idx - self.offsets[s]
        handle = self._shard(s)
        item: dict[str, Any] = {}
        for key in handle.keys():
            if self.keys is None or key in self.keys:
                value = handle.get_slice(key)[j]
                item[key] = value.float() if value.is_floating_point() else value
        for key, values in self._strings[s].items():
            if self.keys is None or key in self.keys:
                item[key] = values[j]
        item.update(self.uncond)
        return item


def write_shard(path: Union[str, Path], tensors: dict[str, torch.Tensor], strings: dict[str, list]) -> None:
    """One shard: equally long tensors and string lists (the latter in the metadata)."""
    from safetensors.torch import save_file
    lengths = {len(v) for v in tensors.values()} | {len(v) for v in strings.values()}
    if len(lengths) != 1:
        raise ValueError(f"shard entries differ in length: {sorted(lengths)}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"strings": json.dumps(strings)})


def write_index(root: Union[str, Path], counts: Sequence[int], **info: Any) -> None:
    shards = [{"file": shard_name(i), "n": int(n)} for i, n in enumerate(counts)]
    index = {"version": FORMAT_VERSION, "n": int(sum(counts)), "shards": shards, **info}
    (Path(root) / INDEX).write_text(json.dumps(index, indent=1))
