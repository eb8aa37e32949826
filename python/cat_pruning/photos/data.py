"""Training data of the photo model: random 64x64 crops of scikit-image's bundled photographs at
several zoom levels, with horizontal flips, captioned "<photo>, <zoom>". Training only: it needs
scikit-image (``pip install 'cat-pruning[train]'``); the shipped model does not.

Each photo is resized once per (zoom, jitter) so that a 64-pixel crop covers ``zoom * jitter`` of
its shorter side (PIL's Lanczos filter, which low-passes when it shrinks); a sample is then only a
random crop of one of those, flipped with probability 1/2. Everything random comes from the
numpy Generator passed in, so a batch is a function of its seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .captions import PHOTOS, ZOOMS, caption

IMAGE_SIZE = 64
JITTER = (0.85, 1.0, 1.2)  # crop side x this, around each zoom level's nominal side


def photo_dir() -> Path:
    """skimage/data inside the installed scikit-image wheel (the files ship with it)."""
    try:
        import skimage
    except ImportError as exc:
        raise ImportError(
            "the photo model's training data are scikit-image's bundled photographs: "
            "pip install 'cat-pruning[train]' (or scikit-image)"
        ) from exc
    return Path(skimage.__file__).resolve().parent / "data"


def load_photo(name: str) -> np.ndarray:
    """The photograph as uint8 (H, W, 3); grey ones repeated to three channels, alpha dropped."""
    from PIL import Image

    path = photo_dir() / PHOTOS[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not in this scikit-image wheel")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class PhotoCrops:
    """Random crops of every photo in PHOTOS at every zoom in ZOOMS.

    ``sample(rng, n)`` -> (x (n, 3, 64, 64) float32 in [-1, 1], captions). Photo, zoom, jitter,
    position and flip are drawn uniformly and independently."""

    def __init__(self, size: int = IMAGE_SIZE, photos: list[str] | None = None, jitter=JITTER):
        from PIL import Image

        self.size = size
        self.photos = list(photos or PHOTOS)
        self.zooms = list(ZOOMS)
        self.levels: dict[tuple[int, int], list[np.ndarray]] = {}  # (photo, zoom) -> resized copies
        for p, name in enumerate(self.photos):
            im = Image.fromarray(load_photo(name))
            short = min(im.size)
            for z, zoom in enumerate(self.zooms):
                copies = []
                for j in jitter:
                    side = min(short, ZOOMS[zoom] * j * short)  # the crop never exceeds the photo
                    scale = size / side
                    w, h = max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))
                    copies.append(np.asarray(im.resize((w, h), Image.LANCZOS)))
                self.levels[(p, z)] = copies

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        s = self.size
        out = np.empty((n, s, s, 3), np.uint8)
        caps = []
        for i in range(n):
            p, z = int(rng.integers(len(self.photos))), int(rng.integers(len(self.zooms)))
            copies = self.levels[(p, z)]
            a = copies[int(rng.integers(len(copies)))]
            y, x = int(rng.integers(a.shape[0] - s + 1)), int(rng.integers(a.shape[1] - s + 1))
            crop = a[y : y + s, x : x + s]
            out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
            caps.append(caption(self.photos[p], self.zooms[z]))
        x = out.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        return x, caps

    def center(self, name: str, zoom: str) -> np.ndarray:
        """The central crop of one photo at one zoom (nominal scale, no flip): uint8 (64, 64, 3)."""
        copies = self.levels[(self.photos.index(name), self.zooms.index(zoom))]
        a = copies[len(copies) // 2]
        y, x = (a.shape[0] - self.size) // 2, (a.shape[1] - self.size) // 2
        return a[y : y + self.size, x : x + self.size]
