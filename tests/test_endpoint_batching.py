"""The local endpoint's inference thread(s) and micro-batching (correctness only, no timing asserts):

- requests taken together are answered as they are alone: the project's model gives the same classes and
  probabilities batched and unbatched;
- in a batch, a request that ``input_fn``, ``predict_fn`` or ``output_fn`` refuses gets its own 4xx/5xx and the
  others their answers (a failing ``predict_batch_fn`` falls back to ``predict_fn`` per request);
- a handler module without ``predict_batch_fn`` is never batched;
- a full queue answers 503 at once and the server keeps serving;
- a keep-alive connection carries several requests;
- the model is loaded on the inference thread that runs ``predict_fn`` (also after a hot swap);
- a hot swap under load fails no request and never goes back to the old model.

Batches are made deterministic by a blocker: a slow request holds the inference thread while the others queue up
(they are then taken together); the tests retry that a few times rather than assert on timing.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_local_endpoints import HANDLER, HANDLER_ENV, tiny_model

from pipelines.local.serving import endpoints

# The toolkit's four functions plus predict_batch_fn; each answer says which thread loaded the model, which ran
# the predict, and how many requests that predict served.
BATCH_HANDLER = '''
import json, os, threading, time
from pathlib import Path

from sagemaker_inference.errors import BaseInferenceToolkitError


class HandlerError(BaseInferenceToolkitError):
    def __init__(self, status, message):
        super().__init__(status, message, message)


def model_fn(model_dir):
    time.sleep(float(os.environ.get("TEST_LOAD_DELAY", "0")))
    config = json.loads((Path(model_dir) / "model.json").read_text())
    return {**config, "load_thread": threading.current_thread().name, "load_ident": threading.get_ident()}


def input_fn(body, content_type):
    try:
        return json.loads(body)
    except ValueError as exc:
        raise HandlerError(400, f"invalid JSON: {exc}")


def _answer(data, model, batch):
    return {"version": model["version"], "echo": data.get("x"), "batch": batch,
            "load_thread": model["load_thread"], "predict_thread": threading.current_thread().name,
            "same_thread": model["load_ident"] == threading.get_ident()}


def predict_fn(data, model):
    if data.get("boom"):
        return 1 / 0
    time.sleep(float(data.get("sleep", 0)))
    return _answer(data, model, 1)


def predict_batch_fn(inputs, model):
    if any(data.get("boom") for data in inputs):
        raise ValueError("cannot batch a boom")
    time.sleep(max(float(data.get("sleep", 0)) for data in inputs))
    return [_answer(data, model, len(inputs)) for data in inputs]


def output_fn(prediction, accept):
    if accept != "application/json":
        raise HandlerError(406, f"cannot produce {accept}")
    return json.dumps(prediction)
'''


def batch_model(tmp_path: Path, version: int) -> Path:
    path = tiny_model(tmp_path / f"batch-{time.monotonic_ns()}", version, batching=True)
    (path / "code" / "handler.py").write_text(BATCH_HANDLER)
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("batching")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLOPS_HOME", str(path / "mlops"))
        patch.setenv("MLOPS_ENDPOINT_MAX_BATCH", "16")
        yield path
        for endpoint in endpoints.list_endpoints():
            endpoints.delete(endpoint.name)


@pytest.fixture(scope="module")
def batching(home) -> endpoints.LocalEndpoint:
    """The batching handler behind one endpoint, shared by the tests that do not swap or limit it."""
    return endpoints.deploy("batching", batch_model(home, 1), environment=HANDLER_ENV, startup_timeout=60)


def request(port: int, body: bytes, content_type: str = "application/json", accept: str = "application/json",
            conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/invocations", body, {"Content-Type": content_type, "Accept": accept})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def behind_a_blocker(port: int, calls: list[Callable[[], tuple[int, bytes]]], blocker: Callable[[], object],
                     settle_s: float = 0.3) -> list[tuple[int, bytes]]:
    """Start ``blocker`` (a slow request that holds the inference thread), then ``calls`` all at once, so that they
    queue behind it and are taken together; their answers in order."""
    held = threading.Thread(target=blocker)
    held.start()
    time.sleep(settle_s)  # the blocker is in the inference thread
    answers: list[tuple[int, bytes] | None] = [None] * len(calls)

    def run(index: int) -> None:
        answers[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in [*threads, held]:
        thread.join(timeout=60)
    assert all(answer is not None for answer in answers)
    return answers  # type: ignore[return-value]


def engine(name: str) -> dict:
    return endpoints.server_status(name)["engine"]


# ------------------------------------------------------------------------------------------ the project's model


def _jpegs(n: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), "RGB").save(buffer, "JPEG")
        out.append(buffer.getvalue())
    return out


def _photo() -> bytes:
    """A smooth 640x480 JPEG (small as a file, photo-sized to decode): 32 of them keep the model busy a while."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _project_model(tmp_path: Path) -> Path:
    from training.model import build_model, save_model
    from training.serving_code import write_serving_code

    config = {"arch": "resnet18", "num_classes": 5, "classes": list("abcde"), "hidden_units": 0, "dropout": 0.0,
              "image_size": 64, "resize_size": 72, "weights_file": "model.pth"}
    save_model(build_model("resnet18", 5, weights=None), config, tmp_path / "project")
    write_serving_code(tmp_path / "project")
    return tmp_path / "project"


def test_batched_answers_equal_unbatched_answers(home):
    endpoint = endpoints.deploy("project", _project_model(home), environment={"SAGEMAKER_PROGRAM": "inference.py"},
                                startup_timeout=120)
    images = _jpegs(6)
    alone = [request(endpoint.port, image, "image/jpeg") for image in images]  # one at a time: batches of 1
    assert [status for status, _ in alone] == [200] * len(images)
    blocker_body = json.dumps({"instances": [base64.b64encode(_photo()).decode()] * 32}).encode()
    for _attempt in range(5):
        together = behind_a_blocker(endpoint.port, [lambda image=image: request(endpoint.port, image, "image/jpeg")
                                                    for image in images],
                                    blocker=lambda: request(endpoint.port, blocker_body), settle_s=0.05)
        for (status, body), (_, reference) in zip(together, alone, strict=True):
            assert status == 200
            ours, theirs = json.loads(body), json.loads(reference)
            assert ours["class_name"] == theirs["class_name"] and ours["predicted_label"] == theirs["predicted_label"]
            assert [t["class_name"] for t in ours["top_k"]] == [t["class_name"] for t in theirs["top_k"]]
            assert ours["confidence"] == pytest.approx(theirs["confidence"], abs=1e-5)
        if any(int(size) > 1 for size in engine("project")["batches"]):
            break
    else:
        pytest.fail(f"no request was ever batched: {engine('project')}")
    assert endpoints.server_status("project")["loaded"]["batch_predict"] is True


# ----------------------------------------------------------------------------------------- errors in a batch


def test_a_bad_request_in_a_batch_gets_its_own_error(batching):
    port = batching.port
    calls = [lambda i=i: request(port, json.dumps({"x": i}).encode()) for i in range(4)]
    calls.append(lambda: request(port, b"{not json"))  # input_fn: 400
    calls.append(lambda: request(port, b'{"x": "csv"}', accept="text/csv"))  # output_fn: 406
    for _attempt in range(5):
        answers = behind_a_blocker(port, calls, blocker=lambda: request(port, b'{"x": "slow", "sleep": 1.0}'))
        good = [json.loads(body) for _, body in answers[:4]]
        assert [status for status, _ in answers] == [200] * 4 + [400, 406]
        assert [answer["echo"] for answer in good] == [0, 1, 2, 3]
        assert answers[4][1].startswith(b"invalid JSON") and answers[5][1].startswith(b"cannot produce text/csv")
        if all(answer["batch"] > 1 for answer in good):
            break  # one predict_batch_fn served them (and the request whose output_fn failed)
    else:
        pytest.fail(f"the good requests were never batched: {good}")

    with_boom = [*calls[:4], lambda: request(port, b'{"boom": true}')]  # predict fails: per-request fallback
    answers = behind_a_blocker(port, with_boom, blocker=lambda: request(port, b'{"x": "slow", "sleep": 1.0}'))
    assert [status for status, _ in answers] == [200] * 4 + [500]
    assert [json.loads(body)["echo"] for _, body in answers[:4]] == [0, 1, 2, 3]
    assert answers[4][1].startswith(b"division by zero")  # predict_fn's own error, from the toolkit


def test_a_module_without_predict_batch_fn_is_never_batched(home):
    endpoint = endpoints.deploy("plain", tiny_model(home, 1), environment=HANDLER_ENV, startup_timeout=60)
    assert HANDLER and "predict_batch_fn" not in HANDLER
    calls = [lambda i=i: request(endpoint.port, json.dumps({"x": i}).encode()) for i in range(5)]
    answers = behind_a_blocker(endpoint.port, calls, blocker=lambda: request(endpoint.port, b'{"sleep": 0.5}'))
    assert [(status, json.loads(body)) for status, body in answers] == [(200, {"version": 1, "echo": i})
                                                                       for i in range(5)]
    assert set(engine("plain")["batches"]) == {"1"}
    assert endpoints.server_status("plain")["loaded"]["batch_predict"] is False


# ------------------------------------------------------------------------------------ back-pressure, keep-alive


def test_full_queue_answers_503_and_the_server_keeps_serving(home, monkeypatch):
    monkeypatch.setenv("MLOPS_ENDPOINT_WORKERS", "1")
    monkeypatch.setenv("MLOPS_ENDPOINT_QUEUE_SIZE", "1")
    endpoint = endpoints.deploy("small", batch_model(home, 1), environment=HANDLER_ENV, startup_timeout=60)
    slow = [threading.Thread(target=lambda: request(endpoint.port, b'{"sleep": 1.0}')) for _ in range(2)]
    for thread in slow:
        thread.start()
    time.sleep(0.4)  # one in the worker (waiting for the inference thread), one waiting for the worker
    status, body = request(endpoint.port, b'{"x": 1}')
    assert status == 503 and json.loads(body)["type"] == "ServiceUnavailableException"
    for thread in slow:
        thread.join(timeout=30)
    status, body = request(endpoint.port, b'{"x": 2}')
    assert status == 200 and json.loads(body)["echo"] == 2


def test_keep_alive_connection_carries_several_requests(batching):
    conn = http.client.HTTPConnection("127.0.0.1", batching.port, timeout=30)
    answers, local_ports = [], set()
    for i in range(5):
        answers.append(request(batching.port, json.dumps({"x": i}).encode(), conn=conn))
        local_ports.add(conn.sock.getsockname()[1])  # the same socket every time: never reconnected
    conn.close()
    assert [json.loads(body)["echo"] for _, body in answers] == list(range(5))
    assert len(local_ports) == 1


# ------------------------------------------------------------------------------------ threads and hot swaps


def test_the_model_is_loaded_on_the_thread_that_runs_it(batching):
    answer = json.loads(request(batching.port, b'{"x": 1}')[1])
    assert answer["same_thread"] is True and answer["load_thread"] == answer["predict_thread"] == "inference-1-0"
    status = endpoints.server_status("batching")
    assert status["loaded"]["loaded_on"] == "inference-1-0" and status["engine"]["inference_threads"] == [
        "inference-1-0"]


def test_hot_swap_under_batched_load(home):
    endpoint = endpoints.deploy("swap", batch_model(home, 1), environment=HANDLER_ENV, startup_timeout=60)
    results: list[tuple[int, dict]] = []
    failures: list[object] = []
    stop = threading.Event()

    def hammer(worker: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=30)
        while not stop.is_set():
            try:
                status, body = request(endpoint.port, json.dumps({"x": worker, "sleep": 0.02}).encode(), conn=conn)
            except (OSError, http.client.HTTPException) as exc:
                failures.append(exc)
                conn.close()
                continue
            if status != 200:
                failures.append((status, body))
            else:
                results.append((worker, json.loads(body)))
        conn.close()

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        endpoints.deploy("swap", batch_model(home, 2), environment={**HANDLER_ENV, "TEST_LOAD_DELAY": "1.0"})
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert failures == []
    versions = [answer["version"] for _, answer in results]
    assert versions.count(1) > 5 and versions.count(2) > 5
    for worker in range(6):  # a client's sequential requests never go back to the old model
        seen = [answer["version"] for w, answer in results if w == worker]
        assert seen == sorted(seen)
    assert all(answer["same_thread"] for _, answer in results)  # each model predicts on the thread that loaded it
    assert {answer["load_thread"] for _, answer in results if answer["version"] == 2} == {"inference-2-0"}
    assert any(answer["batch"] > 1 for _, answer in results)  # six clients on one inference thread do batch
    assert endpoints.server_status("swap")["engine"]["inference_threads"] == ["inference-2-0"]
