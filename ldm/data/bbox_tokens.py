"""Layout conditioning for layout-to-image: object boxes as a fixed-length token sequence
(taming-transformers' `ObjectsBoundingBoxConditionalBuilder`, which LDM's layout2img model
reads under "coordinates_bbox" with a 92-token BERT embedder).

Sequence: for each of `no_max_objects` objects a triple (object token, top-left token,
bottom-right token), padded with the "none" token `no_tokens - 1`, then, with
`encode_crop`, the crop's (top-left, bottom-right) pair: 30 * 3 + 2 = 92 tokens.
A coordinate (x, y) in [0, 1]^2 maps to one token on a grid of `int(sqrt(no_tokens))`
sections per axis: `round(y * (n - 1)) * n + round(x * (n - 1))`. The object token is
`category_no + no_object_classes * modifier`, modifier bit 0 = "group of" (with
`use_group_parameter`), bits 1-3 = occluded / depiction / inside (with
`use_additional_parameters`).

Boxes are (x0, y0, w, h) relative to the full image; objects not intersecting the crop are
dropped, the rest are clipped to it and expressed relative to the crop (or to the full image,
with the crop encoded, when `encode_crop`), mirrored with a horizontal flip.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

BoundingBox = tuple[float, float, float, float]  # x0, y0, w, h in [0, 1]
FULL_CROP: BoundingBox = (0.0, 0.0, 1.0, 1.0)


class Annotation(NamedTuple):
    bbox: BoundingBox
    category_no: int
    is_group_of: bool = False
    is_occluded: bool = False
    is_depiction: bool = False
    is_inside: bool = False


def intersection_area(a: BoundingBox, b: BoundingBox) -> float:
    x = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    y = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return x * y


def flip_bbox(b: BoundingBox) -> BoundingBox:
    return 1 - (b[0] + b[2]), b[1], b[2], b[3]


def rescale(annotations: list[Annotation], crop: BoundingBox, flip: bool) -> list[Annotation]:
    """Boxes relative to `crop` (clipped to it), mirrored when `flip`."""
    def one(b: BoundingBox) -> BoundingBox:
        x0 = min(max((b[0] - crop[0]) / crop[2], 0.0), 1.0)
        y0 = min(max((b[1] - crop[1]) / crop[3], 0.0), 1.0)
        w = min(b[2] / crop[2], 1 - x0)
        h = min(b[3] / crop[3], 1 - y0)
        return (1 - (x0 + w), y0, w, h) if flip else (x0, y0, w, h)
    return [a._replace(bbox=one(a.bbox)) for a in annotations]


class BBoxTokenizer:
    def __init__(
        self,
        no_object_classes: int,  # number of categories (object token = category + classes * modifier)
        no_max_objects: int = 30,  # objects per sequence (extra ones are dropped)
        no_tokens: int = 8192,  # vocabulary size; the last token means "no object"
        encode_crop: bool = True,  # append the crop box as two coordinate tokens
        use_group_parameter: bool = True,  # encode "group of" in the object token
        use_additional_parameters: bool = False,  # encode occluded / depiction / inside too
    ) -> None:
        self.no_object_classes = no_object_classes
        self.no_max_objects = no_max_objects
        self.no_tokens = no_tokens
        self.encode_crop = encode_crop
        self.no_sections = int(math.sqrt(no_tokens))
        self.use_group_parameter = use_group_parameter
        self.use_additional_parameters = use_additional_parameters
        max_token = no_object_classes * (16 if use_additional_parameters else 2 if use_group_parameter else 1)
        if max_token > self.none:
            raise ValueError(f"{no_object_classes} classes with modifiers need {max_token} tokens (< {no_tokens} - 1)")

    @property
    def none(self) -> int:
        return self.no_tokens - 1

    @property
    def embedding_dim(self) -> int:
        return self.no_max_objects * 3 + (2 if self.encode_crop else 0)

    def tokenize_coordinates(self, x: float, y: float) -> int:
        n = self.no_sections
        return int(round(y * (n - 1))) * n + int(round(x * (n - 1)))

    def coordinates_from_token(self, token: int) -> tuple[float, float]:
        n = self.no_sections
        return (token % n) / (n - 1), (token // n) / (n - 1)

    def token_pair_from_bbox(self, b: BoundingBox) -> tuple[int, int]:
        return self.tokenize_coordinates(b[0], b[1]), self.tokenize_coordinates(b[0] + b[2], b[1] + b[3])

    def bbox_from_token_pair(self, t1: int, t2: int) -> BoundingBox:
        (x0, y0), (x1, y1) = self.coordinates_from_token(t1), self.coordinates_from_token(t2)
        return x0, y0, x1 - x0, y1 - y0

    def object_representation(self, a: Annotation) -> int:
        modifier = 0
        if self.use_group_parameter:
            modifier |= 1 * bool(a.is_group_of)
        if self.use_additional_parameters:
            modifier |= 2 * bool(a.is_occluded) | 4 * bool(a.is_depiction) | 8 * bool(a.is_inside)
        return a.category_no + self.no_object_classes * modifier

    def build(self, annotations: list[Annotation], crop: Optional[BoundingBox] = None, flip: bool = False,
              rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """(embedding_dim,) int64 tokens for the objects (in random order when `rng` is given)."""
        crop = crop or FULL_CROP
        annotations = list(annotations)[: self.no_max_objects]
        if rng is not None:
            annotations = [annotations[i] for i in rng.permutation(len(annotations))]
        annotations = [a for a in annotations if intersection_area(a.bbox, crop) > 0.0]
        if self.encode_crop:
            annotations = rescale(annotations, FULL_CROP, flip)
            extra = list(self.token_pair_from_bbox(flip_bbox(crop) if flip else crop))
        else:
            annotations = rescale(annotations, crop, flip)
            extra = []
        triples = [(self.object_representation(a), *self.token_pair_from_bbox(a.bbox)) for a in annotations]
        triples += [(self.none, self.none, self.none)] * (self.no_max_objects - len(triples))
        tokens = np.array([t for triple in triples for t in triple] + extra, dtype=np.int64)
        assert tokens.shape == (self.embedding_dim,) and tokens.min() >= 0 and tokens.max() < self.no_tokens
        return tokens

    def inverse_build(self, tokens: np.ndarray) -> tuple[list[tuple[int, BoundingBox]], Optional[BoundingBox]]:
        """(object token, box) for each non-empty slot, and the crop box (with encode_crop)."""
        t = [int(v) for v in tokens]
        crop = None
        if self.encode_crop:
            crop, t = self.bbox_from_token_pair(t[-2], t[-1]), t[:-2]
        objs = [(t[i], self.bbox_from_token_pair(t[i + 1], t[i + 2])) for i in range(0, len(t), 3) if t[i] != self.none]
        return objs, crop
