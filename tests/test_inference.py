"""The serving handler (inference/inference.py): every content type, batches, and every refusal with its status."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import inference as handler
from pipelines.sample_data import CLASSES, draw_sample
from training.model import IMAGENET_MEAN, IMAGENET_STD, build_model, save_model

pytestmark = pytest.mark.fast

CLASS_NAMES = sorted(CLASSES)  # circle, cross, square, triangle


def write_model(model_dir: Path, classes: list[str], *, image_size: int = 32, seed: int = 0,
                fixed_logits: list[float] | None = None) -> Path:
    """An untrained resnet18 (seeded); with ``fixed_logits`` the head ignores the features and always outputs them."""
    torch.manual_seed(seed)
    net = build_model("resnet18", len(classes))
    if fixed_logits is not None:
        with torch.no_grad():
            net.fc[-1].weight.zero_()
            net.fc[-1].bias.copy_(torch.tensor(fixed_logits))
    config = {"arch": "resnet18", "num_classes": len(classes), "classes": classes, "hidden_units": 0,
              "dropout": 0.0, "image_size": image_size, "resize_size": image_size + 4, "mean": list(IMAGENET_MEAN),
              "std": list(IMAGENET_STD), "weights_file": "model.pth", "best_epoch": 0, "best_valid_accuracy": 0.0,
              "hyperparameters": {}}
    save_model(net, config, model_dir)
    return model_dir


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype.hasobject)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> handler.ServingModel:
    return handler.model_fn(str(write_model(tmp_path_factory.mktemp("model"), CLASS_NAMES)))


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    rng = random.Random(7)
    return {name: draw_sample(name, 48, rng) for name in CLASS_NAMES}


def predict(model, body, content_type, accept="application/json"):
    return json.loads(handler.handle_request(model, body, content_type, accept))


def assert_prediction(result: dict, k: int = 4) -> None:
    assert set(result) == {"predicted_label", "class_name", "confidence", "top_k"}
    assert result["class_name"] == CLASS_NAMES[result["predicted_label"]]
    assert len(result["top_k"]) == k
    probs = [t["probability"] for t in result["top_k"]]
    assert probs == sorted(probs, reverse=True)
    assert result["top_k"][0] == {"class_name": result["class_name"], "probability": result["confidence"]}
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)  # k == number of classes here


# --------------------------------------------------------------------------------------------- happy paths


def test_model_fn_loads_on_cpu_in_eval_mode(model):
    assert model.device.type == "cpu"
    assert not model.network.training
    assert model.classes == CLASS_NAMES


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/x-image", "application/octet-stream",
                                          "image/jpeg; charset=binary"])
def test_jpeg_bytes(model, images, content_type):
    assert_prediction(predict(model, encode(images["circle"], "JPEG"), content_type))


def test_png_npy_and_preprocessed_float_agree(model, images):
    """The same pixels as PNG, HWC uint8 .npy, and CHW float (already transformed) give the same probabilities."""
    img = images["triangle"]
    from_png = predict(model, encode(img, "PNG"), "image/png")
    from_npy = predict(model, npy(np.asarray(img)), "application/x-npy")
    pre = model.transform(img).numpy().astype(np.float32)
    from_float = predict(model, npy(pre), "application/x-npy")
    assert_prediction(from_png)
    for other in (from_npy, from_float):
        assert other["class_name"] == from_png["class_name"]
        assert [t["probability"] for t in other["top_k"]] == pytest.approx(
            [t["probability"] for t in from_png["top_k"]], abs=1e-5)


def test_image_modes_are_converted(model, images):
    img = images["square"]
    for converted, fmt in ((img.convert("L"), "PNG"), (img.convert("RGBA"), "PNG"), (img.convert("CMYK"), "JPEG"),
                           (img.convert("P"), "PNG")):
        assert_prediction(predict(model, encode(converted, fmt), "image/png"))
    gray16 = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    from_16 = predict(model, encode(gray16, "PNG"), "image/png")
    from_8 = predict(model, encode(img.convert("L"), "PNG"), "image/png")
    # 16-bit is scaled down (x*257/257 == x), not clipped to white: identical to the 8-bit image
    assert from_16["top_k"] == from_8["top_k"]


def test_json_single_batch_and_list(model, images):
    jpegs = {name: encode(img, "JPEG") for name, img in images.items()}
    singles = {name: predict(model, json.dumps({"image": b64(data)}), "application/json")
               for name, data in jpegs.items()}
    for result in singles.values():
        assert_prediction(result)
    order = ["triangle", "circle", "cross", "square", "circle"]
    batch = predict(model, json.dumps({"instances": [b64(jpegs[n]) for n in order]}).encode(), "application/json")
    bare = predict(model, json.dumps([b64(jpegs[n]) for n in order]).encode(), "application/json")
    assert isinstance(batch, list) and len(batch) == len(order)
    for name, item, bare_item in zip(order, batch, bare, strict=True):
        assert item["class_name"] == singles[name]["class_name"]
        assert item["confidence"] == pytest.approx(singles[name]["confidence"], abs=1e-5)
        assert bare_item == item


def test_json_variants_data_url_wrapped_urlsafe_and_b64_objects(model, images):
    data = encode(images["cross"], "JPEG")
    reference = predict(model, data, "image/jpeg")
    wrapped = "\n".join(b64(data)[i:i + 76] for i in range(0, len(b64(data)), 76))
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    for doc in ({"image": "data:image/jpeg;base64," + b64(data)}, {"image": wrapped}, {"image": urlsafe}):
        assert predict(model, json.dumps(doc), "application/json") == reference
    assert predict(model, json.dumps({"instances": [{"b64": b64(data)}]}), "application/json") == [reference]


def test_npy_nhwc_batch_matches_singles(model, images):
    stack = np.stack([np.asarray(images[n]) for n in CLASS_NAMES])
    batch = predict(model, npy(stack), "application/x-npy")
    assert isinstance(batch, list) and len(batch) == len(CLASS_NAMES)
    for name, item in zip(CLASS_NAMES, batch, strict=True):
        single = predict(model, npy(np.asarray(images[name])), "application/x-npy")
        assert item["class_name"] == single["class_name"]
        assert [t["probability"] for t in item["top_k"]] == pytest.approx(
            [t["probability"] for t in single["top_k"]], abs=1e-5)
    gray = predict(model, npy(np.asarray(images["circle"].convert("L"))), "application/x-npy")
    assert_prediction(gray)


def test_fixed_head_gives_exact_softmax_and_top_k(tmp_path, images, monkeypatch):
    logits = [0.0, 1.0, 3.0, 2.0]  # circle, cross, square, triangle
    fixed = handler.model_fn(str(write_model(tmp_path, CLASS_NAMES, fixed_logits=logits)))
    expected = torch.softmax(torch.tensor(logits), 0).tolist()
    result = predict(fixed, encode(images["circle"], "PNG"), "image/png")
    assert result["predicted_label"] == 2 and result["class_name"] == "square"
    assert result["confidence"] == pytest.approx(expected[2], abs=1e-6)
    assert [t["class_name"] for t in result["top_k"]] == ["square", "triangle", "cross", "circle"]
    assert [t["probability"] for t in result["top_k"]] == pytest.approx(sorted(expected, reverse=True), abs=1e-6)
    monkeypatch.setenv("INFERENCE_TOP_K", "2")
    result = predict(fixed, encode(images["circle"], "PNG"), "image/png")
    assert [t["class_name"] for t in result["top_k"]] == ["square", "triangle"]


@pytest.mark.parametrize("accept", [None, "", "*/*", "application/json", "application/json; charset=utf-8",
                                    "text/html, application/json;q=0.9", "application/*"])
def test_accept_variants(model, images, accept):
    out = handler.handle_request(model, encode(images["circle"], "JPEG"), "image/jpeg", accept)
    assert_prediction(json.loads(out))


# --------------------------------------------------------------------------------------------- errors


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): a decompression-bomb header."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = 8 + 4  # signature, then length; the chunk type starts here
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 4 + 13]))
    data[ihdr + 4 + 13:ihdr + 4 + 17] = struct.pack(">I", crc)
    return bytes(data)


def _truncated_jpeg() -> bytes:
    data = encode(draw_sample("circle", 64, random.Random(1)), "JPEG")
    return data[: len(data) // 2]


def _lying_npy() -> bytes:
    data = npy(np.zeros((8, 8, 3), np.uint8))
    return data.replace(b"(8, 8, 3)", b"(9, 8, 3)")


ERROR_CASES = [
    # (id, body, content type, exception, status, message fragment)
    ("csv", b"1,2,3", "text/csv", handler.UnsupportedContentType, 415, "unsupported Content-Type 'text/csv'"),
    ("no-content-type", b"\xff\xd8", None, handler.UnsupportedContentType, 415, "unsupported Content-Type '(none)'"),
    ("empty", b"", "image/jpeg", handler.InvalidImage, 400, "empty request body"),
    ("garbage", b"\x00\x01 definitely not an image" * 4, "image/png", handler.InvalidImage, 400,
     "is not a decodable image"),
    ("truncated-jpeg", _truncated_jpeg(), "image/jpeg", handler.InvalidImage, 400, "corrupt or truncated"),
    ("bomb", _png_with_size(100_000, 100_000), "image/png", handler.InvalidImage, 400, "decompression bomb"),
    ("bad-json", b"{not json", "application/json", handler.InvalidRequest, 400, "invalid JSON body"),
    ("json-not-utf8", b"\xff\xfe{", "application/json", handler.InvalidRequest, 400, "not valid UTF-8"),
    ("json-wrong-keys", b'{"img": "x"}', "application/json", handler.InvalidRequest, 400,
     "must have an 'image' (base64 string) or 'instances'"),
    ("json-number", b"42", "application/json", handler.InvalidRequest, 400, "must be an object or a list"),
    ("bad-base64", b'{"image": "not base64 at all!!"}', "application/json", handler.InvalidImage, 400,
     "image: invalid base64"),
    ("base64-of-text", json.dumps({"instances": [b64(b"hello world")]}).encode(), "application/json",
     handler.InvalidImage, 400, "instances[0] (11 bytes) is not a decodable image"),
    ("instance-not-string", b'{"instances": [1]}', "application/json", handler.InvalidRequest, 400,
     "instances[0]: expected a base64-encoded image string, got int"),
    ("empty-batch", b'{"instances": []}', "application/json", handler.InvalidRequest, 400, "empty batch"),
    ("npy-object", npy(np.array([{"a": 1}], dtype=object)), "application/x-npy", handler.InvalidRequest, 400,
     "object dtype"),
    ("npy-lying-header", _lying_npy(), "application/x-npy", handler.InvalidRequest, 400,
     "declares shape (9, 8, 3)"),
    ("npy-not-npy", b"\x93NUMPX garbage", "application/x-npy", handler.InvalidRequest, 400, "not a valid .npy"),
    ("npy-5-channels", npy(np.zeros((8, 8, 5), np.uint8)), "application/x-npy", handler.InvalidRequest, 400,
     "1, 3 or 4 channels last"),
    ("npy-float-hwc", npy(np.zeros((8, 8, 3), np.float32)), "application/x-npy", handler.InvalidRequest, 400,
     "3 channels first"),
    ("npy-out-of-range", npy(np.full((8, 8, 3), 300, np.int32)), "application/x-npy", handler.InvalidRequest, 400,
     "must be in 0..255"),
    ("npy-nan", npy(np.full((3, 8, 8), np.nan, np.float32)), "application/x-npy", handler.InvalidRequest, 400,
     "NaN"),
]


@pytest.mark.parametrize(("body", "content_type", "exc_type", "status", "fragment"),
                         [case[1:] for case in ERROR_CASES], ids=[case[0] for case in ERROR_CASES])
def test_bad_requests_are_refused_with_status_and_message(model, body, content_type, exc_type, status, fragment):
    with pytest.raises(exc_type) as info:
        handler.handle_request(model, body, content_type, "application/json")
    err = info.value
    assert err.status == err.status_code == status
    assert fragment in str(err), str(err)
    assert err.message == str(err) == err.phrase


def test_limits_from_environment(model, images, monkeypatch):
    jpeg = encode(images["circle"], "JPEG")
    monkeypatch.setenv("INFERENCE_MAX_PIXELS", "1000")
    with pytest.raises(handler.InvalidImage, match=r"48x48 = 2304 pixels; the limit is 1000 pixels"):
        handler.handle_request(model, jpeg, "image/jpeg")
    with pytest.raises(handler.InvalidImage, match=r"is 48x48 = 2304 pixels; the limit is 1000"):
        handler.handle_request(model, npy(np.asarray(images["circle"])), "application/x-npy")
    monkeypatch.delenv("INFERENCE_MAX_PIXELS")
    monkeypatch.setenv("INFERENCE_MAX_BODY_BYTES", "100")
    with pytest.raises(handler.PayloadTooLarge, match=r"request body is \d+ bytes; the limit is 100 bytes") as info:
        handler.handle_request(model, jpeg, "image/jpeg")
    assert info.value.status_code == 413
    monkeypatch.delenv("INFERENCE_MAX_BODY_BYTES")
    monkeypatch.setenv("INFERENCE_MAX_BATCH_SIZE", "2")
    with pytest.raises(handler.PayloadTooLarge, match="batch of 3 images exceeds the maximum batch size 2"):
        handler.handle_request(model, json.dumps([b64(jpeg)] * 3), "application/json")
    with pytest.raises(handler.PayloadTooLarge, match="batch of 3 images"):
        handler.handle_request(model, npy(np.zeros((3, 8, 8, 3), np.uint8)), "application/x-npy")
    assert len(predict(model, json.dumps([b64(jpeg)] * 2), "application/json")) == 2


@pytest.mark.parametrize("accept", ["text/csv", "image/png", "application/x-npy, text/plain"])
def test_unsupported_accept_is_406(model, images, accept):
    with pytest.raises(handler.UnsupportedAccept, match="unsupported Accept") as info:
        handler.handle_request(model, encode(images["circle"], "JPEG"), "image/jpeg", accept)
    assert info.value.status_code == 406
    prediction = handler.predict_fn(handler.input_fn(encode(images["circle"], "JPEG"), "image/jpeg"), model)
    with pytest.raises(handler.UnsupportedAccept) as info:
        handler.output_fn(prediction, accept)
    assert info.value.status == 406


def test_handler_keeps_serving_after_errors(model, images):
    jpeg = encode(images["square"], "JPEG")
    before = predict(model, jpeg, "image/jpeg")
    for _, body, content_type, exc_type, _, _ in ERROR_CASES:
        with pytest.raises(exc_type):
            handler.handle_request(model, body, content_type)
    assert predict(model, jpeg, "image/jpeg") == before


def test_errors_are_toolkit_compatible():
    """Same attributes as sagemaker_inference's BaseInferenceToolkitError (status_code, message, phrase)."""
    err = handler.UnsupportedContentType("unsupported Content-Type 'text/csv'")
    assert isinstance(err, handler.InferenceError) and isinstance(err, Exception)
    assert (err.status_code, err.message, err.phrase) == (415, "unsupported Content-Type 'text/csv'",
                                                          "unsupported Content-Type 'text/csv'")
    assert issubclass(handler.PayloadTooLarge, handler.InferenceError)
    clone = pickle.loads(pickle.dumps(err))  # e.g. across a process pool
    assert type(clone) is type(err) and clone.status_code == 415 and str(clone) == str(err)
    try:
        from sagemaker_inference.errors import BaseInferenceToolkitError
    except ImportError:
        return
    assert isinstance(err, BaseInferenceToolkitError)


def test_truncated_jpeg_refused_even_if_process_allows_truncated_images(model, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what importing training.train does
    with pytest.raises(handler.InvalidImage, match="corrupt or truncated"):
        handler.handle_request(model, _truncated_jpeg(), "image/jpeg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_handler_runs_from_the_serving_bundle_layout(tmp_path, images):
    """CONTRACTS §2: ``inference.py`` at the bundle root + ``training/{__init__,model,archives}.py``, imported as a
    top-level module with only the bundle on the path (as the SageMaker PyTorch serving container does)."""
    root = Path(handler.__file__).resolve().parents[1]
    bundle = tmp_path / "code"
    (bundle / "training").mkdir(parents=True)
    shutil.copy(root / "inference" / "inference.py", bundle / "inference.py")
    for name in ("__init__.py", "model.py", "archives.py"):
        shutil.copy(root / "training" / name, bundle / "training" / name)
    model_dir = write_model(tmp_path / "model", CLASS_NAMES)
    (tmp_path / "img.jpg").write_bytes(encode(images["circle"], "JPEG"))
    script = (
        "import json, sys, inference, training.model\n"
        f"assert training.model.__file__.startswith({str(bundle)!r}), training.model.__file__\n"
        f"m = inference.model_fn({str(model_dir)!r})\n"
        f"body = open({str(tmp_path / 'img.jpg')!r}, 'rb').read()\n"
        "out = inference.output_fn(inference.predict_fn(inference.input_fn(body, 'image/jpeg'), m), '*/*')\n"
        "print(json.loads(out)['class_name'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=bundle, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in CLASS_NAMES
