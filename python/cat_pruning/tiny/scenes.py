"""Procedural scenes for the tiny text-to-image model: 1-3 coloured shapes on a plain or
two-colour gradient background, 64x64 RGB, with a caption. Deterministic from a seed.

Captions look like
    "a red circle on a yellow background"
    "a red circle above a blue square on a yellow background"
    "a green bar left of a white triangle on a black to blue gradient"
    "a red circle and a blue square and a green bar on a purple background"
A gradient runs from top (first colour) to bottom (second colour).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 60),
    "blue": (40, 70, 225),
    "yellow": (245, 215, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 135, 20),
    "purple": (135, 45, 180),
}
SHAPES = ("circle", "square", "triangle", "bar")
RELATIONS = ("above", "below", "left of", "right of")

# Every word a caption can contain (the tokenizer's vocabulary, besides special tokens).
VOCAB: tuple[str, ...] = (
    ("a", "an", "and", "on", "background", "to", "gradient", "above", "below", "left", "right", "of")
    + tuple(COLORS)
    + SHAPES
)

IMAGE_SIZE = 64
SUPERSAMPLE = 2


@dataclass
class Shape:
    kind: str
    color: str
    cx: float  # centre, in pixels of the 64x64 image
    cy: float
    size: float  # half-extent in pixels


@dataclass
class Scene:
    shapes: list[Shape]
    background: tuple[str, ...]  # one colour, or two for a top-to-bottom gradient
    relation: str | None  # for two shapes: shapes[0] <relation> shapes[1]

    @property
    def caption(self) -> str:
        def np_(s: Shape) -> str:
            return f"{_article(s.color)} {s.color} {s.kind}"

        if len(self.shapes) == 2 and self.relation is not None:
            subject = f"{np_(self.shapes[0])} {self.relation} {np_(self.shapes[1])}"
        else:
            subject = " and ".join(np_(s) for s in self.shapes)
        if len(self.background) == 1:
            bg = f"on {_article(self.background[0])} {self.background[0]} background"
        else:
            bg = f"on {_article(self.background[0])} {self.background[0]} to {self.background[1]} gradient"
        return f"{subject} {bg}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _extent(kind: str, size: float) -> tuple[float, float]:
    """Half width, half height of a shape's bounding box."""
    if kind == "bar":
        return size * 1.4, size * 0.45
    return size, size


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene (layout only; see render_scene)."""
    names = list(COLORS)
    n_shapes = int(rng.choice([1, 2, 3], p=[0.3, 0.5, 0.2]))
    if rng.random() < 0.3:
        bg = tuple(str(c) for c in rng.choice(names, size=2, replace=False))
    else:
        bg = (str(rng.choice(names)),)
    free = [c for c in names if c not in bg]
    colors = rng.choice(free, size=n_shapes, replace=False)
    kinds = rng.choice(SHAPES, size=n_shapes, replace=n_shapes > len(SHAPES))
    relation = str(rng.choice(RELATIONS)) if n_shapes == 2 else None
    lo, hi = {1: (9.0, 20.0), 2: (7.0, 13.0), 3: (6.0, 10.0)}[n_shapes]

    for _ in range(1000):
        shapes = []
        for k, c in zip(kinds, colors, strict=True):
            size = float(rng.uniform(lo, hi))
            hw, hh = _extent(str(k), size)
            cx = float(rng.uniform(hw + 1, IMAGE_SIZE - 1 - hw))
            cy = float(rng.uniform(hh + 1, IMAGE_SIZE - 1 - hh))
            shapes.append(Shape(str(k), str(c), cx, cy, size))
        if _valid(shapes, relation):
            return Scene(shapes, bg, relation)
    raise RuntimeError("could not place shapes")  # pragma: no cover


def _valid(shapes: list[Shape], relation: str | None) -> bool:
    boxes = []
    for s in shapes:
        hw, hh = _extent(s.kind, s.size)
        boxes.append((s.cx - hw, s.cy - hh, s.cx + hw, s.cy + hh))
    # no overlap between bounding boxes (1 px margin)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            if a[0] < b[2] + 1 and b[0] < a[2] + 1 and a[1] < b[3] + 1 and b[1] < a[3] + 1:
                return False
    if relation is None:
        return True
    a, b = boxes
    (ax, ay), (bx, by) = (shapes[0].cx, shapes[0].cy), (shapes[1].cx, shapes[1].cy)
    dx, dy = abs(ax - bx), abs(ay - by)
    # the relation must hold clearly: separated along its axis, dominant over the other axis
    if relation == "above":
        return a[3] < b[1] and dy > dx
    if relation == "below":
        return b[3] < a[1] and dy > dx
    if relation == "left of":
        return a[2] < b[0] and dx > dy
    if relation == "right of":
        return b[2] < a[0] and dx > dy
    raise ValueError(relation)


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render to a (size, size, 3) uint8 array, anti-aliased by supersampling."""
    ss = size * SUPERSAMPLE
    scale = size / IMAGE_SIZE
    coords = (np.arange(ss, dtype=np.float32) + 0.5) / SUPERSAMPLE / scale
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    if len(scene.background) == 1:
        img = np.broadcast_to(np.array(COLORS[scene.background[0]], np.float32), (ss, ss, 3)).copy()
    else:
        top = np.array(COLORS[scene.background[0]], np.float32)
        bottom = np.array(COLORS[scene.background[1]], np.float32)
        w = (yy / IMAGE_SIZE)[..., None]
        img = (1 - w) * top + w * bottom
    for s in scene.shapes:
        x, y = xx - s.cx, yy - s.cy
        if s.kind == "circle":
            mask = x * x + y * y <= s.size * s.size
        elif s.kind == "square":
            mask = (np.abs(x) <= s.size) & (np.abs(y) <= s.size)
        elif s.kind == "bar":
            hw, hh = _extent("bar", s.size)
            mask = (np.abs(x) <= hw) & (np.abs(y) <= hh)
        elif s.kind == "triangle":
            # apex up, base at y = +size, apex at y = -size, base half-width = size
            mask = (y <= s.size) & (np.abs(x) <= (y + s.size) * 0.5)
        else:
            raise ValueError(s.kind)
        img[mask] = COLORS[s.color]
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_example(seed: int) -> tuple[np.ndarray, str]:
    """One (image uint8 HxWx3, caption) pair, deterministic from `seed`."""
    scene = sample_scene(np.random.default_rng(seed))
    return render_scene(scene), scene.caption


def make_batch(seeds) -> tuple[np.ndarray, list[str]]:
    """Images as float32 (B, 3, 64, 64) in [-1, 1], and captions."""
    imgs, caps = [], []
    for s in seeds:
        img, cap = make_example(int(s))
        imgs.append(img)
        caps.append(cap)
    x = np.stack(imgs).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return x, caps
