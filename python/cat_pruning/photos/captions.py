"""The photo model's captions: which photographs it learned and at which zoom levels.

A caption is "<photo>, <zoom>", e.g. "coffee, close-up". The photographs are those that
scikit-image's wheel bundles under skimage/data (no download); the zoom says how much of the
photo's shorter side a 64x64 crop covers. Pure Python: the runtime needs no scikit-image.
"""

from __future__ import annotations

# caption name -> file in skimage/data: the colour photographs and three grey textures of the wheel
# (no synthetic test patterns, no grey portraits: ten photos x three zooms is what a CPU-hour
# of training can learn).
PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",  # a cat
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
    "hubble": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
}

# zoom word -> the crop's side as a fraction of the photo's shorter side
ZOOMS: dict[str, float] = {"full view": 1.0, "medium": 0.5, "close-up": 0.25}

VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(w for text in (*PHOTOS, *ZOOMS) for w in text.replace(",", " ").split())
)


def caption(photo: str, zoom: str) -> str:
    """'coffee, close-up'."""
    if photo not in PHOTOS or zoom not in ZOOMS:
        raise ValueError(f"unknown photo {photo!r} or zoom {zoom!r}; photos: {list(PHOTOS)}, zooms: {list(ZOOMS)}")
    return f"{photo}, {zoom}"


def all_captions() -> list[str]:
    """Every caption the model was trained on, photo by photo."""
    return [caption(p, z) for p in PHOTOS for z in ZOOMS]


def eval_prompts(n: int) -> list[str]:
    """n captions, every photo once before any photo twice, the zoom rotating with the photo
    (astronaut full view, chelsea medium, coffee close-up, rocket full view, ...)."""
    photos, zooms = list(PHOTOS), list(ZOOMS)
    out: list[str] = []
    i = 0
    while len(out) < n:
        rnd, j = divmod(i, len(photos))
        text = caption(photos[j], zooms[(j + rnd) % len(zooms)])
        i += 1
        if text not in out:
            out.append(text)
        if i > 10 * len(photos) * len(zooms):  # all captions used: repeat them
            out += all_captions()[: n - len(out)]
    return out[:n]
