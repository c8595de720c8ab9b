"""Tiled inspection: cut a camera-sized image into tiles the encoder sees at full size, stitch
the tiles' maps back into one map of the whole image, and score the image.

Why: the encoder sees one S x S image (S <= 518). A 5 MP photo shrunk to S loses defects of a
few pixels entirely (a 0.3 % defect is 1.5 px at S = 518, well under one 14 px patch). A tiled
product (`Product.tiling`, docs/tiling.md) is cut into `tile` x `tile` squares of original
pixels, each resized to S on its own, so a defect keeps `S / tile` of its size instead of
`S / max(W, H)`.

The grid (`grid`): along each axis, tiles start every `tile - overlap` px; the last tile is
moved back to end on the image's edge (so it may overlap its neighbour more than `overlap`);
an image no longer than `tile` along an axis has one tile there, clipped to the image.

Decode once, at the tiles' scale: `imaging.tiled_min_side` picks the DCT scale that leaves
each tile as many decoded pixels as the untiled path leaves the whole image (>= 1.75 x S when
the file has them). Tiles are read in place from that one decode (`imaging.preprocess` with a
`box`: Pillow's resampler reads the region, no crop copy). The whole-image pass is drawn from
the same decode, box-reduced first to the untiled path's scale.

The stitched map ("the model's map scale"): each tile's S x S map keeps its density, so the
whole image's map is `canvas = (round(W * S / tile_w), round(H * S / tile_h))` pixels (4 S per
side for a 4 x 4 grid), scaled down when its longer side exceeds `Tiling.map_max_side` (1024 by
default: a tile's S x S map is an upsampled patch grid, 37 x 37 at S = 518, so full density
would cost 16x the rendering of 4 x 4 tiles for no information). Canvas pixel c belongs to every tile whose original-pixel extent holds
its centre and reads that tile's map at the nearest position (`axis_cover`, exact integers).
A 1 x 1 grid's canvas is the tile's map itself, so its answers are the untiled ones, byte for
byte. Everything drawn from the map (masks, regions, heatmap, overlay) then goes through
`postprocess` exactly as an untiled S x S map does: statistics at the canvas size, expanded to
the original once.

Blending rule in overlaps (`stitch`):
- anomaly: the mean of the covering tiles' (smoothed) anomaly values. A defect near a tile's
  border is half outside one tile's context and fully inside its neighbour's; averaging keeps
  a seam from appearing where one tile sees it and the other does not, and is anomalib's
  Tiler blending.
- class: the type map of the covering tile whose anomaly is highest there (first in raster
  order on ties): the tile that is surest something is wrong names what it is. The pixel
  threshold is applied after stitching, to the blended anomaly.

Image score (`image_score`, `Tiling.image_score`): every input (the whole image and each tile)
is scored by the artifact's rule (`scoring.image_score`); "max" (default) takes
max(whole, max over tiles), so a local defect seen by one tile and a global change that only the
whole view shows (a texture shift across the part) both raise it; "whole", "tiles" and "mean"
(0.5 (whole + max tiles)) are the alternatives measured in docs/tiling.md. Defect-type scores
come from the whole-image pass (the global feature of the whole part).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from service.runtime import imaging
from service.runtime.artifact import Tiling


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one image lie (original pixels) and the size of its stitched map."""

    width: int  # the original (oriented) image
    height: int
    tile_w: int  # a tile's extent (the tile side, clipped to the image)
    tile_h: int
    xs: tuple[int, ...]  # left edges
    ys: tuple[int, ...]  # top edges
    size: int  # the encoder's input side S (each tile's map is S x S)
    map_max_side: int = 1 << 30  # the stitched map's longer side at most (never below S)

    @property
    def count(self) -> int:
        return len(self.xs) * len(self.ys)

    @property
    def inputs(self) -> int:
        """Encoder inputs per image: the whole image, then the tiles; a 1 x 1 grid's only tile is
        the whole-image input itself."""
        return self.count + 1 if self.count > 1 else 1

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of every tile, row by row (the order of inputs and maps)."""
        return [(x, y, x + self.tile_w, y + self.tile_h) for y in self.ys for x in self.xs]

    @property
    def canvas(self) -> tuple[int, int]:
        """(width, height) of the stitched map: the tiles' map density over the whole image,
        scaled down to fit `map_max_side` (but never below S, so a 1 x 1 grid's is S x S)."""
        w, h = self.width * self.size / self.tile_w, self.height * self.size / self.tile_h
        f = min(1.0, max(self.map_max_side, self.size) / max(w, h))
        return max(1, round(w * f)), max(1, round(h * f))

    @cached_property
    def cover_x(self) -> list[tuple[int, int, np.ndarray]]:
        return [axis_cover(self.width, self.canvas[0], x, self.tile_w, self.size) for x in self.xs]

    @cached_property
    def cover_y(self) -> list[tuple[int, int, np.ndarray]]:
        return [axis_cover(self.height, self.canvas[1], y, self.tile_h, self.size) for y in self.ys]


def starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile start positions along one axis (rules in the module docstring)."""
    if length <= tile:
        return (0,)
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return tuple(min(i * stride, length - tile) for i in range(n))


def grid(width: int, height: int, tiling: Tiling, size: int) -> TileGrid:
    """The tile grid of a width x height image for an encoder of input side `size`."""
    return TileGrid(width, height, min(tiling.tile, width), min(tiling.tile, height),
                    starts(width, tiling.tile, tiling.overlap), starts(height, tiling.tile, tiling.overlap), size,
                    tiling.map_max_side)


def axis_cover(length: int, canvas: int, start: int, extent: int, size: int) -> tuple[int, int, np.ndarray]:
    """The canvas positions [c0, c1) whose centres fall inside the tile [start, start + extent)
    of an axis of `length` original px drawn on `canvas` px, and the tile-map index (0..size-1)
    each one reads: floor((centre - start) * size / extent), in exact integers (centre of canvas
    pixel c = (2c + 1) * length / (2 * canvas))."""
    c = np.arange(canvas, dtype=np.int64)
    num = (2 * c + 1) * length - 2 * start * canvas  # 2 * canvas * (centre - start)
    inside = np.flatnonzero((num >= 0) & (num < 2 * extent * canvas))
    c0, c1 = int(inside[0]), int(inside[-1]) + 1
    src = num[c0:c1] * size // (2 * canvas * extent)
    return c0, c1, np.minimum(src, size - 1)


def coverage(g: TileGrid) -> np.ndarray:
    """(Hc, Wc) number of tiles covering each canvas pixel (the grid is a product of the axes)."""
    wc, hc = g.canvas
    per_x, per_y = np.zeros(wc, np.float32), np.zeros(hc, np.float32)
    for c0, c1, _ in g.cover_x:
        per_x[c0:c1] += 1
    for r0, r1, _ in g.cover_y:
        per_y[r0:r1] += 1
    return np.outer(per_y, per_x)


def stitch(g: TileGrid, anomaly: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile maps (n, S, S) -> the whole image's (Hc, Wc) float32 anomaly map (the mean of
    the covering tiles) and uint8 type map (the covering tile with the highest anomaly)."""
    wc, hc = g.canvas
    total = np.zeros((hc, wc), np.float32)
    best = np.full((hc, wc), -np.inf, np.float32)
    classes = np.zeros((hc, wc), np.uint8)
    tiles = ((cy, cx) for cy in g.cover_y for cx in g.cover_x)
    for i, ((r0, r1, sy), (c0, c1, sx)) in enumerate(tiles):
        a = anomaly[i].take(sy, axis=0).take(sx, axis=1)  # rows, then columns: faster than np.ix_
        t = types[i].take(sy, axis=0).take(sx, axis=1)
        total[r0:r1, c0:c1] += a
        view, cls = best[r0:r1, c0:c1], classes[r0:r1, c0:c1]
        higher = a > view
        np.copyto(cls, t, where=higher)
        np.copyto(view, a, where=higher)
    if g.count == 1:
        return total, classes
    return (total / coverage(g)).astype(np.float32), classes


def stitch_mean(g: TileGrid, maps: np.ndarray) -> np.ndarray:
    """Per-tile maps (n, ..., S, S) -> (..., Hc, Wc), the mean of the covering tiles (class
    probability maps for evaluation)."""
    wc, hc = g.canvas
    total = np.zeros((*maps.shape[1:-2], hc, wc), np.float32)
    tiles = ((cy, cx) for cy in g.cover_y for cx in g.cover_x)
    for i, ((r0, r1, sy), (c0, c1, sx)) in enumerate(tiles):
        total[..., r0:r1, c0:c1] += maps[i].take(sy, axis=-2).take(sx, axis=-1)
    return total if g.count == 1 else total / coverage(g)


IMAGE_SCORE_RULES = ("max", "whole", "tiles", "mean")


def image_score(whole: float, tiles: list[float], rule: str = "max") -> float:
    """The image score from the whole-image pass and the tiles' scores (module docstring)."""
    top = max(tiles) if tiles else whole
    if rule == "max":
        return max(whole, top)
    if rule == "whole":
        return whole
    if rule == "tiles":
        return top
    if rule == "mean":
        return 0.5 * (whole + top)
    raise ValueError(f"unknown tiled image score rule {rule!r}; known: {IMAGE_SCORE_RULES}")


@dataclass
class TiledInput:
    """A prepared image's tiles: where they lie and their encoder inputs (none for a 1 x 1
    grid, whose only tile is the whole-image input itself)."""

    grid: TileGrid
    pixel_values: list[np.ndarray]  # (3, S, S) per tile, in `grid.boxes` order; [] when count == 1
    rule: str = "max"

    @property
    def first_tile(self) -> int:
        """Index of the first tile among the image's encoder outputs (the whole image, then the
        tiles): 1, or 0 for a 1 x 1 grid, whose tile is the whole-image input."""
        return self.grid.inputs - self.grid.count


def decoded_box(box: tuple[int, int, int, int], image: Image.Image, width: int, height: int
                ) -> tuple[float, float, float, float]:
    """An original-pixel box in the coordinates of a (possibly DCT-reduced) decode of it."""
    sx, sy = image.width / width, image.height / height
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def cut(image: Image.Image, g: TileGrid, mean, std) -> list[np.ndarray]:
    """Each tile's encoder input, resampled in place from the one decode (no crop copies)."""
    return [imaging.preprocess(image, g.size, mean, std, decoded_box(b, image, g.width, g.height)) for b in g.boxes]


def whole_view(image: Image.Image, size: int) -> Image.Image:
    """The decode the whole-image pass resizes from: box-reduced by the integer factor that
    brings it nearest the untiled path's decode (>= imaging.model_side(S) on the short side),
    so the whole pass costs about what an untiled request's resize does."""
    factor = min(image.width, image.height) // max(1, imaging.model_side(size))
    return image.reduce(factor) if factor > 1 else image
