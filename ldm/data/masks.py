"""Inpainting masks: LaMa's random mask protocol (Suvorov et al. 2022), which LDM's
inpainting experiments follow, and the mask modes SD 2's inpainting data named.

A mask is an (H, W) float32 array, 1 = hole (the region to fill), 0 = kept.

Generator (LaMa `MixedMaskGenerator`): pick "strokes" or "boxes" with probabilities
proportional to (irregular_p, box_p), then
* strokes: U{min_times..max_times} polylines; each starts at a uniform pixel and has
  1 + U{0..4} segments of length 10 + U{0..max_len-1} px, brush width 5 + U{0..max_width-1}
  px, direction 0.01 + U{0..max_angle-1} rad (mirrored for every other polyline), clipped
  to the image, drawn with round joints (cv2.line semantics);
* boxes: U{min_times..max_times} axis-aligned rectangles with sides in
  U{min_size..max_size-1} px (max_size capped to the image minus margins), placed uniformly
  inside a `margin` px border.
Evaluation protocols redraw any mask covering more than `max_area` of the image (LaMa's
`max_tamper_area: 0.5`) or nothing at all. Sizes are given at `base_size` and scaled with
the image's smaller side.

Protocols (LaMa's `configs/data_gen/random_{thin,medium,thick}_512.yaml`, the training mask
mix, and SD 2's modes, which are LaMa's settings at other sizes):

| name          | strokes: times, max len, max width | boxes: times, sizes, margin | p(strokes) | max area |
|---------------|------------------------------------|-----------------------------|------------|----------|
| thin          | 4-70, 100, 20                      | -                           | 1          | 0.5      |
| medium        | 4-10, 200, 100                     | 1-5, 30-150, 0              | 1/1.3      | 0.5      |
| thick         | 1-5, 450, 250                      | 1-4, 30-300, 10             | 1/1.3      | 0.5      |
| large (train) | 1-5, 450, 250                      | 1-4, 30-300, 10             | 1/2        | 1        |
| 256narrow     | 4-50, 40, 10 (at 256)              | -                           | 1          | 1        |
| 256train      | 1-5, 200, 100 (at 256)             | 1-4, 30-150, 10             | 1/2        | 1        |
| 512train      | 1-5, 450, 250                      | 1-4, 30-300, 10             | 1/2        | 1        |
| 512train-large| 1-5, 450, 400                      | 1-4, 75-450, 10             | 1/2        | 1        |

Measured at 512 x 512 over 1,000 draws (seed 0; tests/test_data_paper_masks.py holds these
ranges): hole-area fraction mean / 5th-95th percentile / max: thin 0.27 / 0.06-0.45 / <= 0.5,
medium 0.27 / 0.05-0.46 / <= 0.5, thick 0.27 / 0.05-0.47 / <= 0.5, large 0.32 / 0.04-0.71 / 0.93.
The protocols differ in shape rather than area: boundary length per hole pixel is about
0.15 (thin), 0.04 (medium), 0.02 (thick, large).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ldm.data._image import as_rng


@dataclass(frozen=True)
class Strokes:
    min_times: int  # polylines per mask, inclusive range
    max_times: int
    max_len: int  # segment length 10 + U{0..max_len-1}
    max_width: int  # brush width 5 + U{0..max_width-1}
    max_angle: int = 4  # direction 0.01 + U{0..max_angle-1} radians


@dataclass(frozen=True)
class Boxes:
    min_times: int  # rectangles per mask, inclusive range
    max_times: int
    min_size: int  # side U{min_size..max_size-1}
    max_size: int
    margin: int  # distance kept from the border


@dataclass(frozen=True)
class MaskProtocol:
    strokes: Optional[Strokes]
    boxes: Optional[Boxes]
    irregular_p: float = 1.0  # relative weight of strokes
    box_p: float = 0.0  # relative weight of boxes
    max_area: float = 1.0  # redraw masks covering more than this fraction (eval protocols: 0.5)
    base_size: int = 512  # sizes above are in pixels at this image side


_THICK = Strokes(1, 5, 450, 250)
_THICK_BOXES = Boxes(1, 4, 30, 300, 10)
PROTOCOLS: dict[str, MaskProtocol] = {
    "thin": MaskProtocol(Strokes(4, 70, 100, 20), None, max_area=0.5),
    "medium": MaskProtocol(Strokes(4, 10, 200, 100), Boxes(1, 5, 30, 150, 0), 1.0, 0.3, max_area=0.5),
    "thick": MaskProtocol(_THICK, _THICK_BOXES, 1.0, 0.3, max_area=0.5),
    "large": MaskProtocol(_THICK, _THICK_BOXES, 1.0, 1.0),
    "256narrow": MaskProtocol(Strokes(4, 50, 40, 10), None, base_size=256),
    "256train": MaskProtocol(Strokes(1, 5, 200, 100), Boxes(1, 4, 30, 150, 10), 1.0, 1.0, base_size=256),
    "512train": MaskProtocol(_THICK, _THICK_BOXES, 1.0, 1.0),
    "512train-large": MaskProtocol(Strokes(1, 5, 450, 400), Boxes(1, 4, 75, 450, 10), 1.0, 1.0),
}


def _scaled(p: MaskProtocol, side: int) -> MaskProtocol:
    f = side / p.base_size
    if f == 1:
        return p
    s = lambda v: max(1, int(round(v * f)))  # noqa: E731
    strokes = p.strokes and replace(p.strokes, max_len=s(p.strokes.max_len), max_width=s(p.strokes.max_width))
    boxes = p.boxes and replace(p.boxes, min_size=s(p.boxes.min_size), max_size=s(p.boxes.max_size),
                                margin=int(round(p.boxes.margin * f)))
    return replace(p, strokes=strokes, boxes=boxes, base_size=side)


def stroke_mask(h: int, w: int, cfg: Strokes, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for i in range(int(rng.integers(cfg.min_times, cfg.max_times + 1))):
        x, y = int(rng.integers(w)), int(rng.integers(h))
        first = True
        for _ in range(1 + int(rng.integers(5))):
            angle = 0.01 + int(rng.integers(cfg.max_angle))
            if i % 2 == 0:
                angle = 2 * 3.1415926 - angle
            length = 10 + int(rng.integers(cfg.max_len))
            width = 5 + int(rng.integers(cfg.max_width))
            x2 = int(np.clip(int(x + length * np.sin(angle)), 0, w))
            y2 = int(np.clip(int(y + length * np.cos(angle)), 0, h))
            draw.line([(x, y), (x2, y2)], fill=255, width=width)
            r = width / 2.0  # round caps, as cv2.line with thickness
            for cx, cy in ((x, y), (x2, y2)) if first else ((x2, y2),):
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            x, y, first = x2, y2, False
    return (np.asarray(canvas) > 0).astype(np.float32)


def box_mask(h: int, w: int, cfg: Boxes, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((h, w), np.float32)
    max_size = min(cfg.max_size, h - 2 * cfg.margin, w - 2 * cfg.margin)
    min_size = min(cfg.min_size, max_size - 1)
    if min_size < 1:
        raise ValueError(f"image {h}x{w} too small for boxes with margin {cfg.margin}")
    for _ in range(int(rng.integers(cfg.min_times, cfg.max_times + 1))):
        bw, bh = int(rng.integers(min_size, max_size)), int(rng.integers(min_size, max_size))
        x0 = int(rng.integers(cfg.margin, w - cfg.margin - bw + 1))
        y0 = int(rng.integers(cfg.margin, h - cfg.margin - bh + 1))
        mask[y0:y0 + bh, x0:x0 + bw] = 1
    return mask


def make_mask(h: int, w: int, protocol: str | MaskProtocol = "thick",
              rng: Optional[np.random.Generator | int] = None, max_tries: int = 100) -> np.ndarray:
    """One (h, w) float32 mask (1 = hole) under a protocol; same rng state -> same mask."""
    rng = as_rng(rng)
    p = PROTOCOLS[protocol] if isinstance(protocol, str) else protocol
    p = _scaled(p, min(h, w))
    kinds = [(k, wgt) for k, wgt in (("strokes", p.irregular_p if p.strokes else 0.0),
                                     ("boxes", p.box_p if p.boxes else 0.0)) if wgt > 0]
    probs = np.array([wgt for _, wgt in kinds], dtype=np.float64)
    probs /= probs.sum()
    mask = np.zeros((h, w), np.float32)
    for _ in range(max_tries):
        kind = kinds[int(rng.choice(len(kinds), p=probs))][0]
        mask = stroke_mask(h, w, p.strokes, rng) if kind == "strokes" else box_mask(h, w, p.boxes, rng)
        area = float(mask.mean())
        if 0 < area <= p.max_area:
            return mask
    return mask  # give up redrawing: the last draw


def mask_protocol(name: str) -> MaskProtocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown mask protocol '{name}'; expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]
