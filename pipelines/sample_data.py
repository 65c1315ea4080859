"""Generate a small synthetic image-classification dataset (no download needed).

Each class is a distinct shape in a distinct colour family on a noisy background, so a small network
learns it in a couple of epochs. Optionally adds the kinds of bad and odd files real datasets have
(truncated JPEG, zero-byte file, text file named ``.jpg``, CMYK / grayscale / RGBA / 16-bit images,
a PNG with a ``.jpg`` extension) so the preprocessor's quarantine is exercised.

Used by the tests and by ``make run``:  ``python -m pipelines.sample_data OUT_DIR [--per-class N]``.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# class name -> (shape, base RGB colour)
CLASSES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "circle": ("circle", (220, 40, 40)),
    "square": ("square", (40, 200, 60)),
    "triangle": ("triangle", (50, 70, 220)),
    "cross": ("cross", (230, 200, 30)),
}

# bad files: name -> reason the preprocessor should give (substring)
CORRUPT_FILES = ("truncated.jpg", "empty.jpg", "not_an_image.jpg")


def draw_sample(class_name: str, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """One RGB image of ``class_name``: jittered colour, position and scale on a noisy background."""
    rng = rng or random.Random()
    shape, colour = CLASSES[class_name]
    noise = np.random.default_rng(rng.randrange(2**32)).integers(0, 60, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise + 100, "RGB")
    draw = ImageDraw.Draw(img)
    fill = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in colour)
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


def _write_odd_and_bad_files(class_dir: Path, class_name: str, rng: random.Random, size: int) -> None:
    good = draw_sample(class_name, size, rng)
    buf = io.BytesIO()
    good.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    (class_dir / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (class_dir / "empty.jpg").write_bytes(b"")
    (class_dir / "not_an_image.jpg").write_text("this is not an image\n")
    # odd-but-valid files that must be converted to RGB, not quarantined
    good.convert("CMYK").save(class_dir / "odd_cmyk.jpg", "JPEG")
    good.convert("L").save(class_dir / "odd_gray.png")
    good.convert("RGBA").save(class_dir / "odd_rgba.png")
    gray16 = (np.asarray(good.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(class_dir / "odd_16bit.png")
    good.save(class_dir / "odd_png_named.jpg", "PNG")  # wrong extension, valid content


def make_dataset(out_dir: str | Path, per_class: int = 20, size: int = 64, seed: int = 0,
                 classes: list[str] | None = None, with_bad_files: bool = False,
                 splits: dict[str, float] | None = None) -> Path:
    """Write a class-folder dataset to ``out_dir`` (``out_dir/<class>/<n>.jpg``).

    With ``splits`` (e.g. ``{"train": .7, "valid": .15, "test": .15}``) writes the ``dogImages`` layout
    ``out_dir/<split>/<NNN.class>/...`` instead.
    """
    out = Path(out_dir)
    rng = random.Random(seed)
    names = classes or list(CLASSES)
    for idx, name in enumerate(names, start=1):
        if splits:
            counts = {s: max(1, round(per_class * f)) for s, f in splits.items()}
            targets = [(out / s / f"{idx:03d}.{name}", n) for s, n in counts.items()]
        else:
            targets = [(out / name, per_class)]
        for class_dir, count in targets:
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_sample(name, size, rng).save(class_dir / f"{name}_{i:04d}.jpg", "JPEG", quality=90)
        if with_bad_files:
            _write_odd_and_bad_files(targets[0][0], name, rng, size)
    logger.info("wrote synthetic dataset to %s (%d classes, %d per class)", out, len(names), per_class)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-bad-files", action="store_true")
    args = parser.parse_args(argv)
    make_dataset(args.out_dir, args.per_class, args.size, args.seed, with_bad_files=args.with_bad_files)
    print(args.out_dir)


if __name__ == "__main__":
    main()
