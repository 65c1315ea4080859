"""Hostile input (issue 11): archive bombs, sparse tars, FIFOs, symlinks out of the input, oversize files and
absurd or escaping model configs. Every test is bounded in time and disk, also when run against the code that
did not defend against these (there the subprocess timeouts and small payloads bound it)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipelines.sample_data import draw_sample, make_dataset
from training import archives
from training import model as model_lib

pytestmark = pytest.mark.fast

SCRIPT = Path(__file__).resolve().parents[1] / "steps" / "preprocess.py"
MiB = 2**20
ZEROS = 16 * MiB  # a bomb member: 16 MiB of zeros deflates to ~16 KB
# the documented names (docs/LIMITS.md), spelled out so that the tests pin them
ENV_BYTES, ENV_FILES, ENV_RATIO = "MLOPS_ARCHIVE_MAX_BYTES", "MLOPS_ARCHIVE_MAX_FILES", "MLOPS_ARCHIVE_MAX_RATIO"
LIMIT_ENV = (ENV_BYTES, ENV_FILES, ENV_RATIO)


def run_preprocess(cwd: Path, *args: str, env: dict[str, str] | None = None,
                   timeout: float = 120) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in LIMIT_ENV}
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--workers", "1"], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**clean, **(env or {})})


def disk_bytes(path: Path, blocks: bool = True) -> int:
    """Bytes under ``path`` (links not followed): per file the larger of its apparent size and its allocated
    blocks, so sparse files count at their full size; ``blocks=False``: apparent sizes only (bytes written)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += max(st.st_size, st.st_blocks * 512 if blocks else 0)
    return total


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest" / "manifest.json").read_text())


def reasons_of(out: Path) -> dict[str, str]:
    return {q["path"]: q["reason"] for q in manifest_of(out)["quarantined"]}


def last_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def image_members(per_class: int = 3) -> dict[str, bytes]:
    out = {}
    for cls in ("circle", "square"):
        for i in range(per_class):
            buf = io.BytesIO()
            draw_sample(cls, 32).save(buf, "JPEG")
            out[f"data/{cls}/{cls}_{i}.jpg"] = buf.getvalue()
    return out


def write_archive(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def write_sparse_tar(path: Path, expanded: int, extra: dict[str, bytes] | None = None) -> Path:
    """A tar whose member ``data/circle/sparse.jpg`` expands to ``expanded`` bytes from 512 stored ones: a PAX
    GNU sparse 0.1 member (``GNU.sparse.map``/``GNU.sparse.size``, the format ``tar --sparse --format=posix``
    writes), built with ``tarfile`` since it cannot write sparse members itself."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = b"X" * 512
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("data/circle/sparse.jpg")
        info.size = len(stored)
        info.pax_headers = {"GNU.sparse.size": str(expanded), "GNU.sparse.map": f"0,{len(stored)}"}
        tf.addfile(info, io.BytesIO(stored))
    with tarfile.open(path) as tf:  # the reader sees what a GNU tar sparse archive gives
        member = tf.getmember("data/circle/sparse.jpg")
        assert member.issparse() and member.size == expanded
    return path


# ---------------------------------------------------------------------------------------------------------------
# 1. archive limits, counted while extracting


def _bomb(tmp_path: Path, kind: str) -> Path:
    members = {**image_members(), "data/circle/zeros.jpg": bytes(ZEROS)}
    if kind == "sparse.tar":
        return write_sparse_tar(tmp_path / "input" / "bomb.tar", 64 * MiB, image_members())
    return write_archive(tmp_path / "input" / f"bomb.{kind}", members)


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "sparse.tar"])
def test_bomb_stops_at_default_ratio_limit(tmp_path: Path, kind: str) -> None:
    archive = _bomb(tmp_path, kind)
    assert archive.stat().st_size < 64 * 1024
    out = tmp_path / "processing"
    proc = run_preprocess(tmp_path, "--input-dir", str(archive.parent), "--output-dir", str(out))
    assert proc.returncode == 1, proc.stderr
    line = last_error(proc)
    assert line.startswith("preprocess: error: refusing to extract") and "max_ratio limit of 200" in line
    assert "--archive-max-ratio" in line and ENV_RATIO in line
    assert manifest_of(out)["status"] == "failed" and "max_ratio" in manifest_of(out)["error"]
    assert disk_bytes(out) < 64 * 1024  # the manifest only: nothing extracted or quarantined is left
    assert not list(out.glob(".preprocess-work-*"))


@pytest.mark.parametrize("source", ["flag", "env"])
@pytest.mark.parametrize("kind", ["zip", "tar.gz", "sparse.tar"])
def test_max_bytes_from_flag_or_env(tmp_path: Path, kind: str, source: str) -> None:
    archive = _bomb(tmp_path, kind)
    out = tmp_path / "processing"
    env = {ENV_RATIO: "1e9"}  # let the byte limit be the one that trips
    flags = ["--archive-max-bytes", "3MiB"] if source == "flag" else []
    if source == "env":
        env[ENV_BYTES] = "3MiB"
    proc = run_preprocess(tmp_path, "--input-dir", str(archive), "--output-dir", str(out), *flags, env=env)
    assert proc.returncode == 1, proc.stderr
    line = last_error(proc)
    assert "over the max_bytes limit of 3145728 bytes (3 MiB)" in line
    assert "--archive-max-bytes" in line and ENV_BYTES in line
    assert disk_bytes(out) < 64 * 1024


def test_max_files_from_env(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "input" / "many.tar.gz", image_members(per_class=10))
    out = tmp_path / "processing"
    proc = run_preprocess(tmp_path, "--input-dir", str(archive), "--output-dir", str(out),
                          env={ENV_FILES: "12"})
    assert proc.returncode == 1, proc.stderr
    line = last_error(proc)
    assert "more than 12 entries" in line and "max_files limit of 12" in line and ENV_FILES in line
    proc = run_preprocess(tmp_path, "--input-dir", str(archive), "--output-dir", str(out), "--overwrite",
                          "--archive-max-files", "20", env={ENV_FILES: "12"})  # the flag wins
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def peak_disk(monkeypatch) -> dict[str, int]:
    """In-process: the most bytes under ``sampled["dest"]`` seen just before any chunk is written (apparent
    sizes: the extractor writes densely, and block rounding of small files is not what is limited)."""
    sampled = {"dest": None, "peak": 0}
    charge = archives.ExtractionBudget.charge

    def measured(self, name: str, nbytes: int) -> None:
        sampled["peak"] = max(sampled["peak"], disk_bytes(sampled["dest"], blocks=False))
        charge(self, name, nbytes)

    monkeypatch.setattr(archives.ExtractionBudget, "charge", measured)
    return sampled


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "sparse.tar"])
def test_ratio_is_checked_while_streaming(tmp_path: Path, peak_disk, kind: str) -> None:
    archive = _bomb(tmp_path, kind)
    peak_disk["dest"] = dest = tmp_path / "dest"
    with pytest.raises(archives.ArchiveLimitError) as info:
        archives.safe_extract(archive, dest, archives.ExtractionLimits())
    assert info.value.limit == "max_ratio"
    # what was written never passed 200 x the compressed bytes read, so never 200 x the archive's size
    assert 0 < peak_disk["peak"] <= max(archives.RATIO_GRACE_BYTES, 200 * archive.stat().st_size)
    assert peak_disk["peak"] < ZEROS / 3
    assert not dest.exists()  # created by the call, removed with everything in it


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar", "sparse.tar"])
def test_max_bytes_peak_disk_and_nothing_left(tmp_path: Path, peak_disk, kind: str) -> None:
    if kind == "sparse.tar":
        archive = tmp_path / "many.tar"
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
            for i in range(4):
                info = tarfile.TarInfo(f"d/sparse_{i}.bin")
                info.size = 512
                info.pax_headers = {"GNU.sparse.size": str(MiB), "GNU.sparse.map": "0,512"}
                tf.addfile(info, io.BytesIO(b"X" * 512))
    else:
        archive = write_archive(tmp_path / f"many.{kind}", {f"d/zeros_{i}.bin": bytes(MiB) for i in range(4)})
    limit = 3 * MiB
    limits = archives.ExtractionLimits(max_bytes=limit, max_ratio=1e9)
    peak_disk["dest"] = dest = tmp_path / "dest"
    with pytest.raises(archives.ArchiveLimitError) as info:
        archives.safe_extract(archive, dest, limits)
    assert info.value.limit == "max_bytes" and info.value.value == limit
    assert peak_disk["peak"] <= limit
    if kind != "zip":  # a zip is refused from its central directory before anything is written
        assert peak_disk["peak"] == limit  # three members went out, the fourth was refused
    assert not dest.exists()

    kept = tmp_path / "existing"
    kept.mkdir()
    (kept / "mine.txt").write_text("keep me")
    with pytest.raises(archives.ArchiveLimitError):
        archives.safe_extract(archive, kept, limits)
    assert sorted(p.name for p in kept.iterdir()) == ["mine.txt"]  # what was there stays, nothing else


def test_limits_from_env_are_validated() -> None:
    limits = archives.ExtractionLimits.from_env({ENV_BYTES: "1.5GiB", ENV_FILES: "10",
                                                 ENV_RATIO: "50"})
    assert limits == archives.ExtractionLimits(max_bytes=int(1.5 * 2**30), max_files=10, max_ratio=50.0)
    assert archives.ExtractionLimits.from_env({}) == archives.ExtractionLimits(20 * 2**30, 1_000_000, 200.0)
    with pytest.raises(ValueError, match=ENV_BYTES):
        archives.ExtractionLimits.from_env({ENV_BYTES: "lots"})
    with pytest.raises(ValueError, match="max_ratio must be > 0"):
        archives.ExtractionLimits(max_ratio=0)


# ---------------------------------------------------------------------------------------------------------------
# 2. oversize files are listed, never read nor copied; quarantine/ is bounded


def test_oversize_file_is_listed_not_copied(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=4, size=32, classes=["circle", "square"])
    (data / "circle" / "huge.jpg").write_bytes(os.urandom(3 * MiB))
    out = tmp_path / "processing"
    proc = run_preprocess(tmp_path, "--input-dir", str(data), "--output-dir", str(out), "--max-file-bytes", "1MiB")
    assert proc.returncode == 0, proc.stderr
    assert reasons_of(out)["circle/huge.jpg"] == (f"file of {3 * MiB} bytes exceeds --max-file-bytes {MiB}; "
                                                  "not read, not copied to quarantine/")
    assert not (out / "quarantine" / "circle" / "huge.jpg").exists()


def test_default_max_file_bytes_skips_a_huge_sparse_file(tmp_path: Path) -> None:
    """300 MiB apparent (a hole: no disk used): listed from its size alone, never read or copied."""
    data = make_dataset(tmp_path / "data", per_class=4, size=32, classes=["circle", "square"])
    with open(data / "square" / "hole.jpg", "wb") as fh:
        fh.truncate(300 * MiB)
    out = tmp_path / "processing"
    proc = run_preprocess(tmp_path, "--input-dir", str(data), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert reasons_of(out)["square/hole.jpg"].startswith(f"file of {300 * MiB} bytes exceeds --max-file-bytes")
    assert disk_bytes(out / "quarantine") == 0


def test_quarantine_total_is_capped(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=6, size=32, classes=["circle", "square"])
    for i in range(4):
        (data / "circle" / f"junk_{i}.jpg").write_bytes(os.urandom(400 * 1024))
    out = tmp_path / "processing"
    proc = run_preprocess(tmp_path, "--input-dir", str(data), "--output-dir", str(out),
                          "--max-quarantine-bytes", "1MiB")
    assert proc.returncode == 0, proc.stderr
    reasons = reasons_of(out)
    copied = sorted(p.name for p in (out / "quarantine").rglob("*") if p.is_file())
    assert copied == ["junk_0.jpg", "junk_1.jpg"]  # 800 KiB; a third would pass 1 MiB
    for name in ("junk_2.jpg", "junk_3.jpg"):
        assert reasons[f"circle/{name}"].endswith(f"not copied: quarantine/ would hold more than "
                                                  f"--max-quarantine-bytes {MiB}")
    assert disk_bytes(out / "quarantine") <= MiB


# ---------------------------------------------------------------------------------------------------------------
# 3. only regular files are opened; symlinks never lead out of the input


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_is_listed_never_opened(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=4, size=32, classes=["circle", "square"])
    os.mkfifo(data / "pipe")
    os.mkfifo(data / "circle" / "pipe.jpg")
    out = tmp_path / "processing"
    # opening a FIFO blocks until a writer comes: the old code hung here forever; the timeout bounds that
    proc = run_preprocess(tmp_path, "--input-dir", str(data), "--output-dir", str(out), timeout=60)
    assert proc.returncode == 0, proc.stderr
    reasons = reasons_of(out)
    for rel in ("pipe", "circle/pipe.jpg"):
        assert reasons[rel] == "named pipe (FIFO), not a regular file; never opened"
        assert not os.path.lexists(out / "quarantine" / rel)
    assert manifest_of(out)["totals"]["valid"] == 8


def test_symlinks_out_of_the_input_or_to_folders_are_not_followed(tmp_path: Path) -> None:
    secret = b"root:SECRET-HASH:19000:0:99999:7:::\n"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_bytes(secret)
    draw_sample("circle", 32).save(outside / "looks_like_an_image.jpg")
    data = make_dataset(tmp_path / "data", per_class=4, size=32, classes=["circle", "square"])
    (data / "etc").symlink_to(outside, target_is_directory=True)  # a "class folder" that is /etc
    (data / "circle" / "passwd.jpg").symlink_to(outside / "shadow")
    (data / "circle" / "alias.jpg").symlink_to("circle_0000.jpg")  # stays inside: followed
    (data / "square" / "loop").symlink_to("..", target_is_directory=True)
    (data / "square" / "dangling.jpg").symlink_to("nowhere.jpg")
    out = tmp_path / "processing"
    proc = run_preprocess(tmp_path, "--input-dir", str(data), "--output-dir", str(out), timeout=60)
    assert proc.returncode == 0, proc.stderr
    manifest = manifest_of(out)
    reasons = reasons_of(out)
    assert reasons["etc"] == f"symlink outside the input (-> {outside}); not followed"
    assert reasons["circle/passwd.jpg"] == f"symlink outside the input (-> {outside / 'shadow'}); not followed"
    assert reasons["square/loop"] == "symlink to a folder (-> ..); folder links are not followed"
    assert reasons["square/dangling.jpg"] == "broken or looping symlink (-> nowhere.jpg); not followed"
    assert manifest["classes"] == ["circle", "square"]
    assert manifest["class_counts"] == {"circle": 5, "square": 4}  # alias.jpg read through its link
    for path in out.rglob("*"):
        assert not path.is_symlink()
        if path.is_file():
            assert b"SECRET-HASH" not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------------------------------
# 5. model configs: weights_file stays inside the model directory, sizes are range-checked before allocating


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("model")
    net = model_lib.build_model("mobilenet_v2", 2)
    model_lib.save_model(net, {"arch": "mobilenet_v2", "num_classes": 2, "classes": ["a", "b"],
                               "hidden_units": 0, "dropout": 0.0, "weights_file": "model.pth"}, model_dir)
    return model_dir


def _with_config(src: Path, dest: Path, **changes) -> Path:
    dest.mkdir()
    (dest / "model.pth").write_bytes((src / "model.pth").read_bytes())
    config = {**json.loads((src / model_lib.CONFIG_FILE).read_text()), **changes}
    (dest / model_lib.CONFIG_FILE).write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_weights_file_outside_the_model_dir_is_refused(tmp_path: Path, small_model: Path, how: str) -> None:
    # a loadable state_dict sits outside the model directory: the old code loaded it without a word
    (tmp_path / "elsewhere.pth").write_bytes((small_model / "model.pth").read_bytes())
    weights_file = {"relative": "../elsewhere.pth", "absolute": str(tmp_path / "elsewhere.pth"),
                    "symlink": "link.pth"}[how]
    model_dir = _with_config(small_model, tmp_path / "model", weights_file=weights_file)
    (model_dir / "link.pth").symlink_to(tmp_path / "elsewhere.pth")
    with pytest.raises(ValueError, match="weights_file .* (points outside|must be a relative path inside)"):
        model_lib.load_model(model_dir)
    model_lib.load_model(_with_config(small_model, tmp_path / "fine", weights_file="./model.pth"))


@pytest.mark.parametrize(("num_classes", "hidden_units", "name"), [
    (10**12, 0, "num_classes"), (100_001, 0, "num_classes"), (0, 0, "num_classes"),
    (10, 10**12, "hidden_units"), (10, 65_537, "hidden_units"), (10, -1, "hidden_units"), (2.5, 0, "num_classes"),
])
def test_absurd_sizes_are_refused_before_allocating(num_classes, hidden_units, name: str) -> None:
    # the old code tried: 10**12 classes -> a 2 PB tensor (fails at once), 100_001 -> built silently
    with pytest.raises(ValueError, match=f"^{name} "):
        model_lib.build_model("resnet18", num_classes, hidden_units)


def test_absurd_config_is_refused_by_load_model(tmp_path: Path, small_model: Path) -> None:
    # 10**9 classes x 1280 features: 5 TB, so the old code's allocation failed at once instead of paging
    model_dir = _with_config(small_model, tmp_path / "model", num_classes=10**9, hidden_units=512)
    with pytest.raises(ValueError, match="num_classes = 1000000000 is outside the allowed range 1..100000"):
        model_lib.load_model(model_dir)
    assert model_lib.checked_int("hidden_units", 65_536, model_lib.HIDDEN_UNITS_RANGE) == 65_536
