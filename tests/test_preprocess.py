"""steps/preprocess.py: run as SageMaker runs it (a subprocess with flags) on synthetic datasets, plus unit tests."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.sample_data import CLASSES, CORRUPT_FILES, draw_sample, make_dataset
from steps import preprocess

pytestmark = pytest.mark.fast

SCRIPT = Path(__file__).resolve().parents[1] / "steps" / "preprocess.py"
ODD_FILES = ("odd_cmyk", "odd_gray", "odd_rgba", "odd_16bit", "odd_png_named")
EXPECTED_REASON = {"truncated.jpg": "truncated", "empty.jpg": "empty file",
                   "not_an_image.jpg": "not a recognised image"}


def run_script(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # cwd is outside the repository and PYTHONPATH is not set: the script's bootstrap must find `training`.
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest" / "manifest.json").read_text())


def outputs(out: Path) -> dict[str, dict[str, list[str]]]:
    """{split: {class: sorted file names}} of what the script wrote."""
    return {s: {d.name: sorted(f.name for f in d.iterdir()) for d in sorted((out / s).iterdir())}
            for s in ("train", "validation", "test")}


def output_hashes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for s in ("train", "validation", "test") for p in sorted((out / s).rglob("*")) if p.is_file()}


def expected_fingerprint(root: Path) -> str:
    """The manifest's definition, recomputed independently: sha256 over sorted (relative path, sha256(bytes))
    of every non-hidden file."""
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts))
    for p in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def add_os_clutter(root: Path) -> None:
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "circle" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "__MACOSX" / "circle").mkdir(parents=True)
    (root / "__MACOSX" / "circle" / "._circle_0000.jpg").write_bytes(b"\0\5\26\7resource fork")


# ---------------------------------------------------------------------------------------------------------------
# flat class-folder layout with bad and odd files


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("flat")
    data = make_dataset(tmp / "data", per_class=8, size=64, seed=3, with_bad_files=True)
    add_os_clutter(data)
    Image.new("RGB", (200, 150), "gray").save(data / "square" / "huge.png")  # over --max-pixels below
    out = tmp / "processing"
    proc = run_script(tmp, "--input-dir", str(data), "--output-dir", str(out), "--resize-shorter-side", "32",
                      "--max-pixels", "20000", "--workers", "2", "--seed", "5")
    return data, out, proc


def test_flat_bad_files_quarantined_with_reason(flat_run) -> None:
    data, out, proc = flat_run
    assert proc.returncode == 0, proc.stderr
    manifest = manifest_of(out)
    assert manifest["status"] == "succeeded" and manifest["error"] is None
    reasons = {q["path"]: q["reason"] for q in manifest["quarantined"]}
    expected = {f"{c}/{name}" for c in CLASSES for name in CORRUPT_FILES} | {"square/huge.png"}
    assert set(reasons) == expected
    for path, reason in reasons.items():
        name = Path(path).name
        if name == "huge.png":
            assert "too large" in reason and "200x150" in reason
        else:
            assert EXPECTED_REASON[name] in reason, (path, reason)
        # nothing is lost: the quarantined copy is byte-identical to the input
        assert (out / "quarantine" / path).read_bytes() == (data / path).read_bytes()
    # OS clutter is ignored, neither quarantined nor output
    assert {".DS_Store", "__MACOSX/", "circle/.DS_Store"} <= set(manifest["ignored"])
    assert not any("DS_Store" in p or "MACOSX" in p for p in reasons)


def test_flat_odd_files_converted_to_rgb_and_resized(flat_run) -> None:
    _, out, proc = flat_run
    assert proc.returncode == 0, proc.stderr
    written = {f"{p.parent.name}/{p.stem}": p
               for s in ("train", "validation", "test") for p in (out / s).rglob("*.jpg")}
    for cls in CLASSES:
        for odd in ODD_FILES:
            assert f"{cls}/{odd}" in written, f"{cls}/{odd} was not kept"
        arrays = {}
        for odd in ODD_FILES:
            with Image.open(written[f"{cls}/{odd}"]) as img:
                assert img.format == "JPEG" and img.mode == "RGB"
                assert min(img.size) == 32  # 64 px input, shorter side resized to 32
                arrays[odd] = np.asarray(img, dtype=np.float64)
        # all odd files come from the same picture: 16-bit is scaled (not clipped to white), CMYK is not inverted
        assert np.abs(arrays["odd_16bit"] - arrays["odd_gray"]).mean() < 4
        assert arrays["odd_16bit"].mean() < 230
        assert np.abs(arrays["odd_cmyk"] - arrays["odd_rgba"]).mean() < 12
        assert np.abs(arrays["odd_png_named"] - arrays["odd_rgba"]).mean() < 4
    for p in written.values():
        with Image.open(p) as img:
            assert min(img.size) == 32


def test_flat_split_is_stratified_and_manifest_complete(flat_run) -> None:
    data, out, proc = flat_run
    assert proc.returncode == 0, proc.stderr
    manifest = manifest_of(out)
    classes = sorted(CLASSES)
    assert manifest["classes"] == classes
    assert manifest["class_to_idx"] == {c: i for i, c in enumerate(classes)}
    written = outputs(out)
    # 8 good + 5 odd = 13 per class; 13 * 0.15 rounds to 2 for validation and test
    for cls in classes:
        assert {s: len(written[s][cls]) for s in written} == {"train": 9, "validation": 2, "test": 2}
        assert {s: manifest["counts"][s][cls] for s in written} == {"train": 9, "validation": 2, "test": 2}
    assert manifest["imbalance_ratio"] == 1.0
    assert manifest["totals"] == {"files": 4 * 16 + 1, "valid": 52, "quarantined": 13, "ignored": 3,
                                  "train": 36, "validation": 8, "test": 8}
    assert manifest["input_fingerprint"] == expected_fingerprint(data)
    params = manifest["parameters"]
    assert params["seed"] == 5 and params["resize_shorter_side"] == 32 and params["train_fraction"] == 0.7
    assert manifest["input"]["layout"] == "class_folders" and manifest["input"]["archive"] is None
    assert "preprocess: 52 valid / 65 files" in proc.stdout
    assert not list(out.glob(".preprocess-work-*")), "work dir left behind"


# ---------------------------------------------------------------------------------------------------------------
# dogImages layout, archives


def test_dogimages_split_layout_is_kept(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "dogImages", per_class=10, size=48, splits={"train": .6, "valid": .2, "test": .2})
    out = tmp_path / "processing"
    proc = run_script(tmp_path, "--input-dir", str(data), "--output-dir", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    written = outputs(out)
    for given, split in (("train", "train"), ("valid", "validation"), ("test", "test")):
        expected = {d.name: sorted(f.name for f in d.iterdir()) for d in sorted((data / given).iterdir())}
        assert written[split] == expected
    manifest = manifest_of(out)
    assert manifest["classes"] == ["001.circle", "002.square", "003.triangle", "004.cross"]
    assert manifest["counts"]["validation"]["001.circle"] == 2 and manifest["counts"]["train"]["004.cross"] == 6
    assert manifest["input"]["split_folders"] == {"train": "train", "validation": "valid", "test": "test"}
    assert manifest["split"]["source"] == "given"
    with Image.open(out / "train" / "001.circle" / "circle_0000.jpg") as img:
        assert img.size == (48, 48)  # default --resize-shorter-side 256 never upscales


def _pack(src: Path, archive: Path, wrapper: str) -> None:
    """Archive ``src`` under a wrapping folder, with macOS clutter next to it, like a zip made in Finder."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in files:
                zf.write(p, f"{wrapper}/{p.relative_to(src).as_posix()}")
            zf.writestr(f"__MACOSX/{wrapper}/._circle_0000.jpg", b"\0\5\26\7")
            zf.writestr(f"{wrapper}/.DS_Store", b"\0\0\0\1Bud1")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for p in files:
                tf.add(p, f"{wrapper}/{p.relative_to(src).as_posix()}")


@pytest.fixture(scope="module")
def folder_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("reference")
    data = make_dataset(tmp / "data", per_class=5, size=40, seed=11, classes=["circle", "square", "cross"])
    out = tmp / "processing"
    proc = run_script(tmp, "--input-dir", str(data), "--output-dir", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    return data, out


@pytest.mark.parametrize("archive_name", ["images.zip", "images.tar.gz", "images.tgz"])
def test_archive_input_matches_folder_input(tmp_path: Path, folder_reference, archive_name: str) -> None:
    data, reference = folder_reference
    inputs = tmp_path / "input" / "data"
    inputs.mkdir(parents=True)
    _pack(data, inputs / archive_name, wrapper="my_dataset")
    out = tmp_path / "processing"
    proc = run_script(tmp_path, "--input-dir", str(inputs), "--output-dir", str(out), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    manifest, ref_manifest = manifest_of(out), manifest_of(reference)
    assert manifest["input"]["archive"] == archive_name
    assert manifest["input_fingerprint"] == ref_manifest["input_fingerprint"]
    assert manifest["counts"] == ref_manifest["counts"] and manifest["quarantined"] == []
    assert output_hashes(out) == output_hashes(reference)
    assert not list(out.glob(".preprocess-work-*"))


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_path_traversal_archive_is_refused(tmp_path: Path, kind: str) -> None:
    inputs = tmp_path / "work" / "input"
    inputs.mkdir(parents=True)
    buf = io.BytesIO()
    draw_sample("circle", 32).save(buf, "JPEG")
    payload = buf.getvalue()
    archive = inputs / f"evil.{kind}"
    members = [f"data/circle/{i}.jpg" for i in range(3)] + [f"data/square/{i}.jpg" for i in range(3)]
    members.append("../../escaped.jpg")
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name in members:
                zf.writestr(name, payload)
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for name in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    out = tmp_path / "work" / "processing"
    proc = run_script(tmp_path, "--input-dir", str(inputs), "--output-dir", str(out), "--workers", "1")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("preprocess: error: refusing to extract") and "escaped.jpg" in last
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("escaped.jpg"))
    manifest = manifest_of(out)
    assert manifest["status"] == "failed" and "refusing to extract" in manifest["error"]
    assert not any((out / "train").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# failures


def test_too_few_valid_images_fails_clearly(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=3, size=32, classes=["circle", "square"])
    for cls in ("circle", "square"):
        for i in range(4):
            (data / cls / f"junk_{i}.jpg").write_text("<html>404 Not Found</html>")
    out = tmp_path / "processing"
    proc = run_script(tmp_path, "--input-dir", str(data), "--output-dir", str(out), "--workers", "2")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("preprocess: error: only 6 of 14 files (42.9%) are valid images, below --min-valid-fraction 0.5; "
                    "see manifest 'quarantined'")
    manifest = manifest_of(out)  # still written
    assert manifest["status"] == "failed" and manifest["error"] in last
    assert len(manifest["quarantined"]) == 8
    assert all("not a recognised image" in q["reason"] for q in manifest["quarantined"])
    assert len(list((out / "quarantine").rglob("junk_*.jpg"))) == 8
    assert not any((out / "train").iterdir())


def test_class_too_small_to_split_fails(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=6, size=32, classes=["circle", "square"])
    for p in sorted((data / "square").iterdir())[2:]:
        p.unlink()
    out = tmp_path / "processing"
    # importable entry point, same behaviour as the script
    rc = preprocess.main(["--input-dir", str(data), "--output-dir", str(out), "--workers", "1"])
    assert rc == 1
    manifest = manifest_of(out)
    assert manifest["status"] == "failed"
    assert "class 'square' has too few valid images to split: 2 image(s), need at least 3" in manifest["error"]
    assert manifest["class_counts"] == {"circle": 6, "square": 2}


def test_refuses_non_empty_outputs_without_overwrite(tmp_path: Path, folder_reference) -> None:
    data, _ = folder_reference
    out = tmp_path / "processing"
    (out / "train" / "stale").mkdir(parents=True)
    (out / "train" / "stale" / "old.jpg").write_bytes(b"old")
    args = ["--input-dir", str(data), "--output-dir", str(out), "--workers", "1"]
    assert preprocess.main(args) == 1
    assert (out / "train" / "stale" / "old.jpg").exists()
    assert preprocess.main([*args, "--overwrite"]) == 0
    assert not (out / "train" / "stale").exists()


# ---------------------------------------------------------------------------------------------------------------
# determinism


def test_same_seed_same_split_regardless_of_workers(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=10, size=40, seed=2, classes=["circle", "square", "triangle"])
    runs = {}
    for name, seed, workers in (("a", "7", "1"), ("b", "7", "2"), ("c", "8", "2")):
        out = tmp_path / name
        proc = run_script(tmp_path, "--input-dir", str(data), "--output-dir", str(out), "--seed", seed,
                          "--workers", workers, "--resize-shorter-side", "24")
        assert proc.returncode == 0, proc.stderr
        runs[name] = out
    assert output_hashes(runs["a"]) == output_hashes(runs["b"])
    drop = ("parameters",)
    ma, mb = ({k: v for k, v in manifest_of(runs[n]).items() if k not in drop} for n in "ab")
    assert ma == mb
    assert outputs(runs["a"]) != outputs(runs["c"])  # a different seed gives a different split...
    assert manifest_of(runs["a"])["counts"] == manifest_of(runs["c"])["counts"]  # ...with the same sizes


# ---------------------------------------------------------------------------------------------------------------
# unit tests of the pieces


def test_validate_and_convert_odd_modes(tmp_path: Path) -> None:
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    transparent.save(tmp_path / "alpha.png")
    half = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    half.save(tmp_path / "gray16.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "palette.gif", transparency=1)
    Image.new("F", (8, 8), 0.5).save(tmp_path / "float.tif")
    Image.new("L", (3000, 2000)).save(tmp_path / "bomb.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) * 2 // 3])

    for name, expected in (("alpha.png", (255, 255, 255)), ("gray16.png", (128, 128, 128)),
                           ("palette.gif", (255, 255, 255)), ("float.tif", (128, 128, 128))):
        assert preprocess.validate_image(tmp_path / name) == (True, "ok")
        with Image.open(tmp_path / name) as img:
            img.load()
            rgb = preprocess.to_rgb(img)
        assert rgb.mode == "RGB" and rgb.getpixel((4, 4)) == expected, name
    ok, reason = preprocess.validate_image(tmp_path / "bomb.png", max_pixels=1_000_000)
    assert not ok and reason == "image too large: 3000x2000 = 6000000 pixels exceeds --max-pixels 1000000"
    assert preprocess.validate_image(tmp_path / "bomb.png")[0]  # under the default limit
    assert preprocess.validate_image(tmp_path / "full.png") == (True, "ok")
    ok, reason = preprocess.validate_image(tmp_path / "cut.png")
    assert not ok and reason.startswith("truncated or corrupt image data (PNG"), reason


def test_split_counts_and_stratified_split() -> None:
    fractions = {"train": 0.7, "validation": 0.15, "test": 0.15}
    assert preprocess.split_counts(13, fractions) == {"train": 9, "validation": 2, "test": 2}
    assert preprocess.split_counts(3, fractions) == {"train": 1, "validation": 1, "test": 1}
    assert preprocess.split_counts(100, fractions) == {"train": 70, "validation": 15, "test": 15}
    assert preprocess.split_counts(2, {"train": 0.8, "validation": 0.2, "test": 0.0}) == {
        "train": 1, "validation": 1, "test": 0}
    with pytest.raises(preprocess.PreprocessError, match="need at least 3"):
        preprocess.split_counts(2, fractions)

    items = {"a": [f"a/{i}" for i in range(20)], "b": [f"b/{i}" for i in range(7)]}
    result = preprocess.split(items, fractions, seed=1)
    for cls, files in items.items():
        got = [f for s in result for f in result[s][cls]]
        assert sorted(got) == sorted(files)  # a partition: nothing lost or duplicated
    assert [len(result[s]["a"]) for s in fractions] == [14, 3, 3]
    assert [len(result[s]["b"]) for s in fractions] == [5, 1, 1]
    # order of the input does not matter; the seed does
    shuffled = {k: list(reversed(v)) for k, v in items.items()}
    assert preprocess.split(shuffled, fractions, seed=1) == result
    assert preprocess.split(items, fractions, seed=2) != result


def test_discover_layouts(tmp_path: Path) -> None:
    make_dataset(tmp_path / "flat", per_class=2, size=16, classes=["circle", "square"])
    found = preprocess.discover(tmp_path / "flat")
    assert found.layout == "class_folders"
    assert [c.rel for c in found.candidates] == [
        "circle/circle_0000.jpg", "circle/circle_0001.jpg", "square/square_0000.jpg", "square/square_0001.jpg"]
    make_dataset(tmp_path / "wrap" / "dogImages", per_class=4, size=16, classes=["circle", "square"],
                 splits={"train": .5, "val": .25, "test": .25})
    root, archive = preprocess.resolve_input(tmp_path / "wrap", tmp_path / "work")
    assert root == tmp_path / "wrap" / "dogImages" and archive is None
    found = preprocess.discover(root)
    assert found.layout == "splits" and found.split_dirs == {"test": "test", "train": "train", "validation": "val"}
    assert {c.split for c in found.candidates} == {"train", "validation", "test"}
    (tmp_path / "nosplit" / "valid" / "circle").mkdir(parents=True)
    (tmp_path / "nosplit" / "test" / "circle").mkdir(parents=True)
    with pytest.raises(preprocess.PreprocessError, match="no train split"):
        preprocess.discover(tmp_path / "nosplit")
