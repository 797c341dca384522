"""Vector quantiser of the VQ first stage, with taming-transformers' `VectorQuantizer2` semantics.

For z (B, C, H, W), each C-vector is replaced by its nearest codebook entry e_k,
k = argmin_j ||z - e_j||^2. The argmin is taken over |e_j|^2 - 2 z.e_j (|z|^2 is the same for
every j, so it cannot change the argmin; one fused addmm instead of four passes over the
(N, n_e) matrix), in float32, in row chunks of bounded size; exact ties break towards the
lowest index as the original's argmin. Rounding differs from the original's expansion only
by a few float32 ulps of |z|^2, far below the gaps between best and second-best distances in
the golden fixtures (>= 8.7e-3). Gradients pass straight through to z.

Loss (VQ-VAE, van den Oord et al. 2017, Eq. 3): codebook term ||sg[z] - e||^2 and
commitment term ||z - sg[e]||^2. With `legacy=True` (what every released model used) beta
multiplies the *codebook* term: loss = ||sg[e] - z||^2 + beta * ||e - sg[z]||^2; with
`legacy=False` it multiplies the commitment term as in the paper.

`remap` (a .npy of used codebook indices; a relative path resolves against the current
working directory) re-indexes codes into that subset; indices outside it become
`unknown_index`: "random" (a `torch.randint` draw), "extra" (one extra index) or an int.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ldm import perf


class VectorQuantizer2(nn.Module):
    def __init__(self, n_e: int, e_dim: int, beta: float, remap: Optional[str] = None,
                 unknown_index: Union[str, int] = "random", sane_index_shape: bool = False, legacy: bool = True):
        # n_e: codebook size; e_dim: code dimension (= channels of z); beta: loss weight (see module doc)
        # remap: .npy file of used indices (None: no remapping); unknown_index: "random" | "extra" | int
        # sane_index_shape: return indices as (B, H, W) instead of flat (B*H*W,)
        # legacy: beta on the codebook term (released models) instead of the commitment term
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

        self.remap = remap
        if remap is not None:
            self.register_buffer("used", torch.tensor(np.load(remap)))
            self.re_embed = int(self.used.shape[0])
            self.unknown_index = unknown_index
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    # ------------------------------------------------------------------ remapping
    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Full-codebook indices (B, ...) -> positions in `used`; unknown ones -> `unknown_index`."""
        ishape = inds.shape
        assert len(ishape) > 1, "remap_to_used expects a batch axis"
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, ...]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape).to(device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in `used` (B, ...) -> full-codebook indices; the "extra" index maps to used[0]."""
        ishape = inds.shape
        assert len(ishape) > 1, "unmap_to_all expects a batch axis"
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > used.shape[0]:
            inds = inds.masked_fill(inds >= used.shape[0], 0)
        return used[inds].reshape(ishape)

    # ------------------------------------------------------------------ quantisation
    _CHUNK_ELEMENTS = 1 << 24       # (rows x n_e) distances held at once: 64 MiB of float32

    @torch.no_grad()
    def nearest_indices(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(N, C) vectors -> (N,) index of the nearest codebook entry (squared L2)."""
        w = self.embedding.weight.float()                  # (n_e, C)
        w_sq = torch.sum(w ** 2, dim=1)                    # (n_e,)
        z_flat = z_flat.float()
        rows = max(1, self._CHUNK_ELEMENTS // max(1, w.shape[0]))
        out = torch.empty(z_flat.shape[0], dtype=torch.long, device=z_flat.device)
        with perf.full_precision(z_flat.device):             # bf16 distances would change indices
            for i in range(0, z_flat.shape[0], rows):
                d = torch.addmm(w_sq, z_flat[i:i + rows], w.t(), beta=1, alpha=-2)   # |e|^2 - 2 z.e
                out[i:i + rows] = torch.argmin(d, dim=1)
        return out

    def forward(self, z: torch.Tensor, temp: Optional[float] = None, rescale_logits: bool = False,
                return_logits: bool = False):
        """z (B, C, H, W) -> (z_q (B, C, H, W), loss (), (perplexity=None, min_encodings=None, indices))."""
        assert temp is None or temp == 1.0, "temp exists only for interface compatibility with Gumbel quantisers"
        assert not rescale_logits and not return_logits, "only for interface compatibility with Gumbel quantisers"
        z = z.permute(0, 2, 3, 1).contiguous()           # (B, H, W, C)
        z_flat = z.view(-1, self.e_dim)                   # (B*H*W, C)
        min_encoding_indices = self.nearest_indices(z_flat)
        z_q = self.embedding(min_encoding_indices).view(z.shape)

        codebook = torch.mean((z_q - z.detach()) ** 2)
        commitment = torch.mean((z_q.detach() - z) ** 2)
        loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook

        z_q = z + (z_q - z).detach()                      # straight-through estimator
        z_q = z_q.permute(0, 3, 1, 2).contiguous()

        if self.remap is not None:
            min_encoding_indices = self.remap_to_used(min_encoding_indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            min_encoding_indices = min_encoding_indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, min_encoding_indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[Sequence[int]]) -> torch.Tensor:
        """Indices -> code vectors; with `shape` = (B, H, W, C) the result is (B, C, H, W)."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
