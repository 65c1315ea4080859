"""Serving handler: the SageMaker PyTorch inference toolkit contract (``model_fn``, ``input_fn``, ``predict_fn``,
``output_fn``), also served as-is by the local endpoint server.

Request content types (``Content-Type``; parameters such as ``; charset=utf-8`` are ignored):

- ``image/jpeg``, ``image/png``, ``application/x-image``, ``application/octet-stream``: the raw bytes of one image
  (JPEG, PNG, WebP, BMP or GIF; any mode is converted to RGB; EXIF orientation is applied).
- ``application/json``: ``{"image": "<base64>"}`` (one image), ``{"instances": ["<base64>", ...]}`` or a bare list
  ``["<base64>", ...]`` (a batch). A list item may also be ``{"b64": "<base64>"}``; ``data:image/...;base64,``
  prefixes, line breaks and URL-safe base64 are accepted.
- ``application/x-npy``: a NumPy ``.npy`` file (``allow_pickle=False``; the header is checked before any memory is
  allocated). **Integer** arrays are pixels in 0..255: ``HW`` (grayscale), ``HWC`` (one image) or ``NHWC`` (a batch)
  with C in {1, 3, 4}; they go through the model's own ``eval_transform``. **Floating-point** arrays are taken as
  already-preprocessed model input: ``CHW`` (one image) or ``NCHW`` (a batch) with C == 3, resized and normalized
  by the caller exactly like ``training.model.eval_transform`` does; they are passed to the network unchanged.

Response (``Accept``: ``application/json``, ``application/*``, ``*/*`` or none): one JSON object per image
``{"predicted_label": int, "class_name": str, "confidence": float, "top_k": [{"class_name", "probability"}, ...]}``;
a batch request (``instances``, a JSON list, an ``NHWC``/``NCHW`` array) gets a JSON list, in request order.

Errors are raised as :class:`InferenceError` subclasses carrying the HTTP status (``status`` and ``status_code``)
and a precise message. When ``sagemaker_inference`` is importable (inside the SageMaker serving containers) they
subclass its ``BaseInferenceToolkitError``, which the toolkit's ``Transformer`` turns into that HTTP status instead
of a 500 (its own ``UnsupportedFormatError`` is a plain ``Exception`` and would become a 500). Nothing here exits the
process: a bad request fails that request only.

``predict_batch_fn(inputs, model)`` is not part of the toolkit's contract: the local endpoint server calls it to
predict several requests (each already through ``input_fn``) in one forward pass, and answers each with what
``predict_fn`` would have given it; SageMaker's toolkit ignores it.

Limits (environment variables, read per request): ``INFERENCE_MAX_BODY_BYTES`` (default 16 MiB, per image and per
request body), ``INFERENCE_MAX_PIXELS`` (default 4096*4096 per image; bigger images, decompression bombs included,
are refused from their header before being decoded), ``INFERENCE_MAX_BATCH_SIZE`` (default 32 images per request),
``INFERENCE_TOP_K`` (default 5, capped at the number of classes), ``INFERENCE_MAX_JSON_BYTES`` (default 6 MiB, a JSON
body; SageMaker's real-time payload limit) and ``INFERENCE_MAX_JSON_DEPTH`` (default 32 levels of ``[``/``{``
nesting; checked by a linear scan before parsing, so a pathologically deep body is a 400, not a ``RecursionError``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

try:
    from training.images import to_rgb
    from training.model import eval_transform, load_model
except ImportError:  # run from a checkout or a bundle whose root is not on sys.path yet
    for _root in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
        if (_root / "training" / "model.py").is_file() and str(_root) not in sys.path:
            sys.path.insert(0, str(_root))
    from training.images import to_rgb
    from training.model import eval_transform, load_model

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"
NPY_CONTENT_TYPE = "application/x-npy"
IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image", "application/octet-stream")
SUPPORTED_CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, JSON_CONTENT_TYPE, NPY_CONTENT_TYPE)
SUPPORTED_ACCEPTS = (JSON_CONTENT_TYPE, "application/*", "*/*")
RESPONSE_CONTENT_TYPE = JSON_CONTENT_TYPE
# Pillow decoders we are willing to run on untrusted bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

# Serializes the rare decodes that must switch off a process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES = True``.
_TRUNCATION_LOCK = threading.Lock()

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_TOP_K = 5
DEFAULT_MAX_JSON_BYTES = 6 * 1024 * 1024
DEFAULT_MAX_JSON_DEPTH = 32
# One JSON string literal (escapes included), for skipping strings when counting brackets.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET_STEP = np.zeros(256, dtype=np.int8)  # byte -> change of nesting depth
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1

try:  # inside the SageMaker serving containers: let the toolkit map our errors to their HTTP status
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ToolkitErrorBase
except ImportError:  # pragma: no cover - depends on the environment
    class _ToolkitErrorBase(Exception):  # type: ignore[no-redef]
        """Same constructor and attributes as ``sagemaker_inference.errors.BaseInferenceToolkitError``."""

        def __init__(self, status_code: int, message: str, phrase: str) -> None:
            self.status_code = status_code
            self.message = message
            self.phrase = phrase
            super().__init__(status_code, message, phrase)


class InferenceError(_ToolkitErrorBase):
    """A request the handler refuses; ``status``/``status_code`` is the HTTP status to answer with."""

    status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(self.status, message, message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type, tuple[str]]:  # picklable despite the toolkit's 3-argument base
        return self.__class__, (self.message,)


class InvalidRequest(InferenceError):
    """Malformed request (bad JSON, wrong structure, empty batch, unusable array)."""

    status = 400


class InvalidImage(InferenceError):
    """Image bytes that are empty, undecodable, truncated, badly base64-encoded or too many pixels."""

    status = 400


class PayloadTooLarge(InferenceError):
    """Body or image bigger than ``INFERENCE_MAX_BODY_BYTES``, or more images than ``INFERENCE_MAX_BATCH_SIZE``."""

    status = 413


class UnsupportedContentType(InferenceError):
    status = 415


class UnsupportedAccept(InferenceError):
    status = 406


@dataclass
class ServingModel:
    """What ``model_fn`` returns and ``predict_fn`` consumes."""

    network: torch.nn.Module
    config: dict[str, Any]
    classes: list[str]
    device: torch.device
    transform: Any

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class InferenceInput:
    """What ``input_fn`` returns: RGB images and/or preprocessed ``CHW`` float tensors, and whether the request
    was a batch (which decides between a JSON object and a JSON list in the response)."""

    images: list[Image.Image | torch.Tensor] = field(default_factory=list)
    batched: bool = False


@dataclass
class Prediction:
    results: list[dict[str, Any]]
    batched: bool


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        logger.warning("ignoring %s=%r (not an integer); using %d", name, raw, default)
        return default
    return value if value > 0 else default


def max_body_bytes() -> int:
    return _env_int("INFERENCE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)


def max_pixels() -> int:
    return _env_int("INFERENCE_MAX_PIXELS", DEFAULT_MAX_PIXELS)


def max_batch_size() -> int:
    return _env_int("INFERENCE_MAX_BATCH_SIZE", DEFAULT_MAX_BATCH_SIZE)


def max_json_bytes() -> int:
    return _env_int("INFERENCE_MAX_JSON_BYTES", DEFAULT_MAX_JSON_BYTES)


def max_json_depth() -> int:
    return _env_int("INFERENCE_MAX_JSON_DEPTH", DEFAULT_MAX_JSON_DEPTH)


# --------------------------------------------------------------------------------------------------- model_fn


def model_fn(model_dir: str) -> ServingModel:
    """Load ``model.pth`` + ``model_config.json`` from ``model_dir``: CUDA (channels_last) when available, else CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network, config = load_model(model_dir, device=device)
    if device.type == "cuda":
        network = network.to(memory_format=torch.channels_last)
    classes = [str(c) for c in config.get("classes") or range(int(config["num_classes"]))]
    if len(classes) != int(config["num_classes"]):
        raise ValueError(f"{model_dir}/model_config.json: {len(classes)} classes listed but num_classes="
                         f"{config['num_classes']}")
    logger.info("loaded %s (%d classes, image_size %s) from %s on %s", config.get("arch"), len(classes),
                config.get("image_size"), model_dir, device)
    return ServingModel(network=network, config=config, classes=classes, device=device,
                        transform=eval_transform(config))


# --------------------------------------------------------------------------------------------------- input_fn


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _as_bytes(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    if hasattr(body, "read"):
        return _as_bytes(body.read())
    raise InvalidRequest(f"unsupported request body type {type(body).__name__}; expected bytes")


def _check_size(n_bytes: int, what: str) -> None:
    limit = max_body_bytes()
    if n_bytes > limit:
        raise PayloadTooLarge(f"{what} is {n_bytes} bytes; the limit is {limit} bytes (INFERENCE_MAX_BODY_BYTES)")


def _check_batch(n: int) -> None:
    limit = max_batch_size()
    if n > limit:
        raise PayloadTooLarge(f"batch of {n} images exceeds the maximum batch size {limit} "
                              "(INFERENCE_MAX_BATCH_SIZE); split the request")


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    """Decode untrusted image bytes into an RGB image, refusing empty, oversized, undecodable, truncated and
    too-many-pixel input (checked from the header, before the pixels are decoded) with :class:`InvalidImage`."""
    if not data:
        raise InvalidImage(f"{what} is empty (0 bytes)")
    _check_size(len(data), what)
    limit = max_pixels()
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = img.size
        if width <= 0 or height <= 0:
            raise InvalidImage(f"{what} has invalid dimensions {width}x{height}")
        if width * height > limit:
            raise InvalidImage(f"{what} is {width}x{height} = {width * height} pixels; the limit is {limit} "
                               "pixels (INFERENCE_MAX_PIXELS); possible decompression bomb")
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            # Some code in this process (e.g. training/train.py, when imported) asked Pillow to pad truncated
            # files; a truncated request image must still be refused, not half-grey.
            with _TRUNCATION_LOCK:
                saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
                try:
                    img.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = saved
        else:
            img.load()
        try:
            img = ImageOps.exif_transpose(img) or img
        except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored (as preprocess does)
            logger.debug("%s: ignoring malformed EXIF orientation", what)
        return to_rgb(img)
    except InferenceError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"{what} refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(f"{what} ({len(data)} bytes) is not a decodable image; supported formats: "
                           f"{', '.join(IMAGE_FORMATS)}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct_error) as exc:
        raise InvalidImage(f"{what} is corrupt or truncated: {exc}") from exc


def _b64decode(item: Any, what: str) -> bytes:
    if isinstance(item, dict):
        key = next((k for k in ("b64", "image", "data") if k in item), None)
        if key is None:
            raise InvalidRequest(f"{what}: object needs a 'b64' key holding base64 image bytes; got keys "
                                 f"{sorted(item)}")
        item = item[key]
    if not isinstance(item, str):
        raise InvalidRequest(f"{what}: expected a base64-encoded image string, got {type(item).__name__}")
    text = item.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidImage(f"{what}: data URL without ';base64,' payload")
    text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    if not text:
        raise InvalidImage(f"{what} is empty (no base64 data)")
    _check_size(len(text) * 3 // 4, what)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"{what}: invalid base64: {exc}") from exc


def json_depth(data: bytes) -> int:
    """The deepest ``[``/``{`` nesting of a JSON text, without parsing it: string literals are cut out (one regex
    pass), then +1/-1 per bracket is summed up (one numpy pass). Linear time at C speed (a 6 MB body of brackets:
    ~50 ms); brackets are ASCII, so it runs on the UTF-8 bytes."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b"", data), dtype=np.uint8)
    if skeleton.size == 0:
        return 0
    return int(np.cumsum(_BRACKET_STEP[skeleton], dtype=np.int64).max(initial=0))


def _load_json(data: bytes) -> Any:
    """``json.loads`` for an untrusted body: size and nesting depth checked first (INFERENCE_MAX_JSON_BYTES,
    INFERENCE_MAX_JSON_DEPTH), so neither memory nor the parser's recursion is at the sender's mercy."""
    limit = max_json_bytes()
    if len(data) > limit:
        raise PayloadTooLarge(f"JSON body is {len(data)} bytes; the limit is {limit} bytes (INFERENCE_MAX_JSON_BYTES)")
    depth_limit = max_json_depth()
    # Fewer opening brackets than the limit (any string included) cannot nest deeper: no scan needed.
    if data.count(b"[") + data.count(b"{") > depth_limit and (depth := json_depth(data)) > depth_limit:
        raise InvalidRequest(f"JSON body nests {depth} levels deep; the limit is {depth_limit} levels "
                             "(INFERENCE_MAX_JSON_DEPTH)")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"JSON body is not valid UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"invalid JSON body: {exc}") from exc
    except RecursionError as exc:  # INFERENCE_MAX_JSON_DEPTH set above what the parser can recurse
        raise InvalidRequest(f"JSON body nests too deeply to parse (at most {depth_limit} levels are allowed, "
                             f"INFERENCE_MAX_JSON_DEPTH)") from exc


def _parse_json(data: bytes) -> InferenceInput:
    doc = _load_json(data)
    if isinstance(doc, dict):
        if "image" in doc:
            items, batched, where = [doc["image"]], False, "image"
        elif "instances" in doc:
            items, batched, where = doc["instances"], True, "instances"
            if not isinstance(items, list):
                raise InvalidRequest(f"'instances' must be a list of base64 strings, got {type(items).__name__}")
        else:
            raise InvalidRequest("JSON object must have an 'image' (base64 string) or 'instances' (list of base64 "
                                 f"strings) key; got keys {sorted(doc)}")
    elif isinstance(doc, list):
        items, batched, where = doc, True, "body"
    elif isinstance(doc, str):
        items, batched, where = [doc], False, "body"
    else:
        raise InvalidRequest(f"JSON body must be an object or a list, got {type(doc).__name__}")
    if not items:
        raise InvalidRequest("empty batch: no images in the request")
    _check_batch(len(items))
    images: list[Image.Image | torch.Tensor] = []
    for i, item in enumerate(items):
        what = f"{where}[{i}]" if batched else where
        images.append(decode_image(_b64decode(item, what), what))
    return InferenceInput(images=images, batched=batched)


def _load_npy(data: bytes) -> np.ndarray:
    """``np.load`` without trusting the header: pickles refused, the declared size checked against the body."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    except ValueError as exc:
        raise InvalidRequest(f"not a valid .npy payload: {exc}") from exc
    if dtype.hasobject:
        raise InvalidRequest(f"refusing .npy with object dtype {dtype} (pickles are not accepted)")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    expected = count * dtype.itemsize
    payload = data[buf.tell():]
    if len(payload) != expected:
        raise InvalidRequest(f".npy header declares shape {shape} of {dtype} ({expected} bytes) but the payload "
                             f"has {len(payload)} bytes")
    array = np.frombuffer(payload, dtype=dtype, count=count)
    return array.reshape(shape, order="F" if fortran else "C")


def _check_pixels(height: int, width: int, what: str) -> None:
    limit = max_pixels()
    if height * width > limit:
        raise InvalidImage(f"{what} is {width}x{height} = {height * width} pixels; the limit is {limit} pixels "
                           "(INFERENCE_MAX_PIXELS)")
    if height < 1 or width < 1:
        raise InvalidImage(f"{what} has invalid dimensions {width}x{height}")


def _parse_npy(data: bytes) -> InferenceInput:
    array = _load_npy(data)
    if array.dtype.kind in "iu":
        if array.ndim == 2:
            array, batched = array[None, :, :, None], False
        elif array.ndim == 3:
            array, batched = array[None], False
        elif array.ndim == 4:
            batched = True
        else:
            raise InvalidRequest(f"integer .npy must be HW, HWC or NHWC pixels; got shape {array.shape}")
        n, h, w, c = array.shape
        if c not in (1, 3, 4):
            raise InvalidRequest(f"integer .npy must be HWC/NHWC with 1, 3 or 4 channels last; got shape "
                                 f"{tuple(array.shape)} (float arrays are taken as preprocessed CHW/NCHW input)")
        if n == 0:
            raise InvalidRequest("empty batch: .npy array has 0 images")
        _check_batch(n)
        _check_pixels(h, w, "array image")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InvalidRequest(f"integer pixels must be in 0..255; got range {array.min()}..{array.max()}")
        pixels = array.astype(np.uint8)
        modes = {1: "L", 3: "RGB", 4: "RGBA"}
        images: list[Image.Image | torch.Tensor] = [
            to_rgb(Image.fromarray(pixels[i, :, :, 0] if c == 1 else pixels[i], modes[c])) for i in range(n)
        ]
        return InferenceInput(images=images, batched=batched)
    if array.dtype.kind == "f":
        if array.ndim == 3:
            array, batched = array[None], False
        elif array.ndim == 4:
            batched = True
        else:
            raise InvalidRequest(f"float .npy must be preprocessed CHW or NCHW input; got shape {array.shape}")
        n, c, h, w = array.shape
        if c != 3:
            raise InvalidRequest(f"float .npy must be CHW/NCHW with 3 channels first; got shape {tuple(array.shape)}"
                                 " (send uint8 HWC/NHWC for raw pixels)")
        if n == 0:
            raise InvalidRequest("empty batch: .npy array has 0 images")
        _check_batch(n)
        _check_pixels(h, w, "array image")
        if not np.isfinite(array).all():
            raise InvalidRequest("float .npy contains NaN or infinite values")
        tensor = torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))
        return InferenceInput(images=list(tensor.unbind(0)), batched=batched)
    raise InvalidRequest(f"unsupported .npy dtype {array.dtype}; send uint8 pixels or float32 preprocessed input")


def input_fn(request_body: Any, request_content_type: str | None) -> InferenceInput:
    """Deserialize a request body (see the module docstring for the accepted content types and shapes)."""
    content_type = _media_type(request_content_type)
    if content_type not in SUPPORTED_CONTENT_TYPES:
        shown = request_content_type if request_content_type else "(none)"
        raise UnsupportedContentType(f"unsupported Content-Type {shown!r}; supported: "
                                     f"{', '.join(SUPPORTED_CONTENT_TYPES)}")
    data = _as_bytes(request_body)
    if not data:
        raise InvalidImage(f"empty request body (Content-Type {content_type})")
    _check_size(len(data), "request body")
    if content_type == JSON_CONTENT_TYPE:
        return _parse_json(data)
    if content_type == NPY_CONTENT_TYPE:
        return _parse_npy(data)
    return InferenceInput(images=[decode_image(data, "image")], batched=False)


# --------------------------------------------------------------------------------------------------- predict_fn


def _model_inputs(input_data: InferenceInput, model: ServingModel) -> list[torch.Tensor]:
    """One request's images as preprocessed ``CHW`` tensors of one shape (what ``predict_fn`` refuses, refused)."""
    if not isinstance(input_data, InferenceInput):
        raise InvalidRequest(f"predict_fn expects the output of input_fn, got {type(input_data).__name__}")
    if not input_data.images:
        raise InvalidRequest("empty batch: no images in the request")
    _check_batch(len(input_data.images))
    tensors = [item if isinstance(item, torch.Tensor) else model.transform(item) for item in input_data.images]
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise InvalidRequest(f"images of one batch must have the same shape after preprocessing; got "
                             f"{sorted({tuple(t.shape) for t in tensors})}")
    return tensors


def _forward(tensors: list[torch.Tensor], model: ServingModel) -> list[dict[str, Any]]:
    """One forward pass on tensors of one shape (bf16 autocast on CUDA); one result per tensor."""
    batch = torch.stack(tensors).to(model.device, non_blocking=True)
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
    if model.device.type == "cuda":
        batch = batch.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    with torch.inference_mode(), autocast:
        logits = model.network(batch)
    probs = torch.softmax(logits.float(), dim=1).cpu()
    k = min(_env_int("INFERENCE_TOP_K", DEFAULT_TOP_K), model.num_classes)
    top_p, top_i = probs.topk(k, dim=1)
    results = []
    for row_p, row_i in zip(top_p.tolist(), top_i.tolist(), strict=True):
        results.append({
            "predicted_label": int(row_i[0]),
            "class_name": model.classes[row_i[0]],
            "confidence": float(row_p[0]),
            "top_k": [{"class_name": model.classes[i], "probability": float(p)} for p, i in zip(row_p, row_i,
                                                                                                 strict=True)],
        })
    return results


def predict_fn(input_data: InferenceInput, model: ServingModel) -> Prediction:
    """Run the network on every image of the request (one forward pass; bf16 autocast on CUDA)."""
    results = _forward(_model_inputs(input_data, model), model)
    logger.debug("predicted %d image(s): %s", len(results), [r["class_name"] for r in results])
    return Prediction(results=results, batched=input_data.batched)


def predict_batch_fn(inputs: list[InferenceInput], model: ServingModel) -> list[Prediction]:
    """``predict_fn`` for several requests at once (the local endpoint's micro-batching): the images of all of them
    go through the network together, in forward passes of at most ``INFERENCE_MAX_BATCH_SIZE`` images of one shape,
    and each request gets the :class:`Prediction` ``predict_fn`` would give it (the same classes; probabilities
    equal to float rounding, as a different batch size may sum in another order).

    Raises what ``predict_fn`` raises for any one of them; the caller then predicts them one by one, so that only
    that request fails. Not a toolkit function: the SageMaker toolkit never calls it (TorchServe's batching calls
    ``predict_fn`` per request through the toolkit), so serving on AWS is unchanged.
    """
    per_request = [_model_inputs(item, model) for item in inputs]
    flat = [tensor for tensors in per_request for tensor in tensors]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, tensor in enumerate(flat):
        by_shape.setdefault(tuple(tensor.shape), []).append(position)
    results: list[dict[str, Any]] = [{} for _ in flat]
    chunk = max_batch_size()
    for positions in by_shape.values():
        for first in range(0, len(positions), chunk):
            part = positions[first:first + chunk]
            for position, result in zip(part, _forward([flat[i] for i in part], model), strict=True):
                results[position] = result
    predictions, start = [], 0
    for item, tensors in zip(inputs, per_request, strict=True):
        predictions.append(Prediction(results=results[start:start + len(tensors)], batched=item.batched))
        start += len(tensors)
    logger.debug("predicted %d image(s) of %d requests in one batch", len(flat), len(inputs))
    return predictions


# --------------------------------------------------------------------------------------------------- output_fn


def _accepts_json(accept: str | None) -> bool:
    if accept is None or not accept.strip():
        return True
    return any(_media_type(part) in SUPPORTED_ACCEPTS for part in accept.split(","))


def output_fn(prediction: Prediction, accept: str | None) -> str:
    """Serialize to JSON (the only response type): an object for one image, a list for a batch request."""
    if not _accepts_json(accept):
        raise UnsupportedAccept(f"unsupported Accept {accept!r}; this model only answers {RESPONSE_CONTENT_TYPE}")
    payload: Any = prediction.results if prediction.batched else prediction.results[0]
    return json.dumps(payload)


def handle_request(model: ServingModel, body: Any, content_type: str | None, accept: str | None = None) -> str:
    """``input_fn`` → ``predict_fn`` → ``output_fn`` for one request (the toolkit's default ``transform_fn`` order);
    the ``Accept`` header is checked first so that an unanswerable request costs no inference."""
    if not _accepts_json(accept):
        raise UnsupportedAccept(f"unsupported Accept {accept!r}; this model only answers {RESPONSE_CONTENT_TYPE}")
    return output_fn(predict_fn(input_fn(body, content_type), model), accept)
