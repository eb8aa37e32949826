"""Procedural video clips for the video model: one or two coloured shapes moving or growing over a
textured background that does not move, captioned. Deterministic from a seed.

Captions look like
    "a red circle moving left over blue stripes"
    "a green square growing over white checks"
    "a yellow triangle moving up and an orange circle shrinking over purple dots"

Most of every clip is its static background: the case token pruning is made for (the tokens of
the background barely change between denoising steps, the shapes' do).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..tiny.scenes import COLORS as SCENE_COLORS

# The scene model's colours but black (a texture's dark half is dark already), and cyan
COLORS: dict[str, tuple[int, int, int]] = {
    **{name: rgb for name, rgb in SCENE_COLORS.items() if name != "black"}, "cyan": (30, 200, 210)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")
TEXTURES = ("stripes", "checks", "dots", "waves")
VOCAB: tuple[str, ...] = ("a", "an", "and", "over", "moving", "left", "right", "up", "down", "growing", "shrinking",
                          *COLORS, *SHAPES, *TEXTURES)

SIZE = 32  # pixels per side
FRAMES = 8
_DARK = 0.35  # a texture's dark parts: its colour times this


@dataclass(frozen=True)
class Mover:
    shape: str
    color: str
    motion: str
    x: float  # centre at the first frame, in pixels
    y: float
    radius: float  # half-extent at the first frame, in pixels
    speed: float  # pixels (moving) or pixels of radius (growing, shrinking) per frame

    def at(self, frame: int) -> tuple[float, float, float]:
        """(x, y, radius) at a frame."""
        d = self.speed * frame
        dx, dy, dr = {"moving left": (-d, 0, 0), "moving right": (d, 0, 0), "moving up": (0, -d, 0),
                      "moving down": (0, d, 0), "growing": (0, 0, d), "shrinking": (0, 0, -d)}[self.motion]
        return self.x + dx, self.y + dy, max(self.radius + dr, 1.5)

    @property
    def phrase(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape} {self.motion}"


@dataclass(frozen=True)
class Clip:
    movers: tuple[Mover, ...]
    texture: str
    texture_color: str
    phase: float  # where the texture's pattern starts, in pixels

    @property
    def caption(self) -> str:
        return " and ".join(m.phrase for m in self.movers) + f" over {self.texture_color} {self.texture}"


def random_clip(rng: np.random.Generator) -> Clip:
    """One or two movers (distinct colours, not the texture's) over a texture."""
    colors = list(rng.permutation(list(COLORS)))
    texture_color = colors.pop()
    movers = []
    for i in range(1 + int(rng.random() < 0.4)):
        motion = MOTIONS[rng.integers(len(MOTIONS))]
        radius = float(rng.uniform(4.0, 7.0))
        speed = float(rng.uniform(1.0, 2.0)) if motion.startswith("moving") else float(rng.uniform(0.5, 0.8))
        # start where the motion keeps the shape mostly in view
        margin = radius + 1
        x, y = (float(rng.uniform(margin, SIZE - margin)) for _ in range(2))
        travel = speed * (FRAMES - 1)
        if motion == "moving left":
            x = float(rng.uniform(SIZE / 2, SIZE - margin + travel / 2))
        elif motion == "moving right":
            x = float(rng.uniform(margin - travel / 2, SIZE / 2))
        elif motion == "moving up":
            y = float(rng.uniform(SIZE / 2, SIZE - margin + travel / 2))
        elif motion == "moving down":
            y = float(rng.uniform(margin - travel / 2, SIZE / 2))
        elif motion == "shrinking":
            radius = float(rng.uniform(7.0, 10.0))
        movers.append(Mover(SHAPES[rng.integers(len(SHAPES))], colors[i], motion, x, y, radius, speed))
    return Clip(tuple(movers), TEXTURES[rng.integers(len(TEXTURES))], texture_color, float(rng.uniform(0, 8)))


def _texture(clip: Clip) -> np.ndarray:
    """(SIZE, SIZE) in [0, 1]: how much of the texture colour each pixel shows (static)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    p = clip.phase
    if clip.texture == "stripes":
        t = np.sin((xx + yy + p) * np.pi / 4)
    elif clip.texture == "checks":
        t = np.sin((xx + p) * np.pi / 4) * np.sin((yy + p) * np.pi / 4)
    elif clip.texture == "dots":
        t = np.cos((xx + p) * np.pi / 3) + np.cos((yy + p) * np.pi / 3) - 1
    else:  # waves
        t = np.sin((yy + 2 * np.sin((xx + p) * np.pi / 8)) * np.pi / 3)
    return np.clip(0.5 + 1.5 * t, 0, 1)


def _coverage(shape: str, x: float, y: float, r: float) -> np.ndarray:
    """(SIZE, SIZE) in [0, 1]: how much of each pixel the shape covers (a one-pixel soft edge)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dx, dy = xx - x, yy - y
    if shape == "circle":
        dist = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        dist = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    else:  # an upward triangle: inside the three half-planes
        dist = np.maximum.reduce([dy - 0.7 * r, -0.866 * dx - 0.5 * dy - 0.6 * r, 0.866 * dx - 0.5 * dy - 0.6 * r])
    return np.clip(0.5 - dist, 0, 1)


def render(clip: Clip) -> np.ndarray:
    """(FRAMES, SIZE, SIZE, 3) float32 in [0, 1]."""
    color = np.array(COLORS[clip.texture_color], np.float32) / 255
    t = _texture(clip)[..., None]
    background = t * color + (1 - t) * _DARK * color
    frames = np.empty((FRAMES, SIZE, SIZE, 3), np.float32)
    for f in range(FRAMES):
        img = background.copy()
        for m in clip.movers:
            a = _coverage(m.shape, *m.at(f))[..., None]
            img = a * (np.array(COLORS[m.color], np.float32) / 255) + (1 - a) * img
        frames[f] = img
    return frames


def batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """n random clips as (n, 3, FRAMES, SIZE, SIZE) in [-1, 1] (the video model's layout) and captions."""
    clips = [random_clip(rng) for _ in range(n)]
    x = np.stack([render(c) for c in clips]).transpose(0, 4, 1, 2, 3) * 2 - 1
    return x.astype(np.float32), [c.caption for c in clips]


# The quality bench's captions: clips from seeds the training never draws (it draws from
# np.random.default_rng([seed, step]) sequences), in a fixed order.
EVAL_SEED = 987_654


def eval_captions(n: int, offset: int = 0) -> list[str]:
    """n distinct held-out captions (after `offset` of them)."""
    rng = np.random.default_rng(EVAL_SEED)
    seen: list[str] = []
    while len(seen) < n + offset:
        c = random_clip(rng).caption
        if c not in seen:
            seen.append(c)
    return seen[offset:]
