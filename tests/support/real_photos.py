"""Real photographs for tests and measurements, obtainable offline from a package registry (Debian's).

Debian's ``tuxpaint-stamps-default`` (GPL-2, 161 MB ``.deb``) ships photographs of real objects cut out onto
transparent PNGs (``usr/share/tuxpaint/stamps/<category>/...``; drawings live under ``cartoon`` folders and as
SVGs, both skipped). Five visually distinct classes hold 31-40 photos each (185 in all): bird, mammal, fruit_veg,
plant, household. :func:`photo_folder` fetches the package with ``apt-get download`` (no install, no root needed
beyond what apt's download needs), unpacks it with ``dpkg -x`` into a cache (``$IMGCLF_CACHE``, default
``~/.cache/imgclf-mlops``) and writes an ImageFolder (``<root>/<class>/<n>.jpg``, alpha flattened onto white,
longest side 256 px). Nothing of it is committed.

    python tests/support/real_photos.py /tmp/photos     # the folder the README's own-data command can take
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = "tuxpaint-stamps-default"
CLASSES: dict[str, tuple[str, ...]] = {
    "bird": ("animals/birds",), "mammal": ("animals/mammals",), "fruit_veg": ("food/fruit", "food/vegetables"),
    "plant": ("plants",), "household": ("household",),
}
PER_CLASS = 40


class PhotosUnavailable(RuntimeError):
    """The package could not be fetched (no apt, no Debian mirror reachable)."""


def cache_dir() -> Path:
    return Path(os.environ.get("IMGCLF_CACHE") or Path.home() / ".cache" / "imgclf-mlops")


def _stamps_root() -> Path:
    unpacked = cache_dir() / PACKAGE
    stamps = unpacked / "usr" / "share" / "tuxpaint" / "stamps"
    if stamps.is_dir():
        return stamps
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise PhotosUnavailable("apt-get/dpkg not found: the real photos come from Debian's " + PACKAGE)
    download = cache_dir() / "deb"
    download.mkdir(parents=True, exist_ok=True)
    debs = sorted(download.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        fetched = subprocess.run(["apt-get", "download", PACKAGE], cwd=download, capture_output=True, text=True,
                                 check=False)
        debs = sorted(download.glob(f"{PACKAGE}_*.deb"))
        if fetched.returncode != 0 or not debs:
            raise PhotosUnavailable(f"apt-get download {PACKAGE} failed: {fetched.stderr.strip()[-300:]}")
    partial = unpacked.with_name(unpacked.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(partial)], check=True, capture_output=True)
    partial.rename(unpacked)
    return stamps


def _photos(stamps: Path, folders: tuple[str, ...]) -> list[str]:
    found = (f for folder in folders for f in glob.glob(f"{stamps}/{folder}/**/*.png", recursive=True))
    return sorted(f for f in found if "cartoon" not in f and "_mirror" not in f and "_flip" not in f)[:PER_CLASS]


def photo_folder(root: str | Path) -> Path:
    """An ImageFolder of the five classes under ``root`` (reused when complete); :class:`PhotosUnavailable`."""
    from PIL import Image

    root = Path(root)
    marker = root / ".complete"
    if marker.is_file():
        return root
    stamps = _stamps_root()
    for name, folders in CLASSES.items():
        target = root / name
        target.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(_photos(stamps, folders)):
            with Image.open(path) as image:
                rgba = image.convert("RGBA")
            flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            flat.alpha_composite(rgba)
            rgb = flat.convert("RGB")
            rgb.thumbnail((256, 256))
            rgb.save(target / f"{i}.jpg", quality=90)
    marker.write_text(PACKAGE)
    return root


def counts(root: str | Path) -> dict[str, int]:
    return {d.name: len(list(d.glob("*.jpg"))) for d in sorted(Path(root).iterdir()) if d.is_dir()}


if __name__ == "__main__":
    folder = photo_folder(sys.argv[1] if len(sys.argv) > 1 else "real-photos")
    sys.stdout.write(f"{folder}: {counts(folder)}\n")
