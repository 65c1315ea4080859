"""Local batch transform jobs (:mod:`pipelines.local.jobs.transform`): a tiny CSV model served through the local
endpoint's handler chain (SageMaker's PyTorch inference toolkit, ``code/inference.py`` in model.tar.gz) in a worker
subprocess; records split per SplitType, batched per BatchStrategy, assembled per AssembleWith into ``.out`` files;
DataProcessing filters and joins; the errors a job fails with."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from pipelines.local.jobs import transform
from pipelines.local.jobs.runtime import JobError, _arn
from pipelines.local.jobs.transform import TransformSettings, make_batches, run_transform_job, transform_object
from pipelines.local.storage.store import ArtifactStore

PYTORCH_IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.5-cpu-py311"
LINEAR_LEARNER_IMAGE = "382416733822.dkr.ecr.us-east-1.amazonaws.com/linear-learner:1"
XGBOOST_IMAGE = "683313688378.dkr.ecr.us-east-1.amazonaws.com/sagemaker-xgboost:1.7-1"

# The toolkit's four functions on CSV lines: every request appends "<rows> <SAGEMAKER_BATCH_STRATEGY>" to
# $TEST_CALLS, so a test sees how the records were batched.
HANDLER = '''
import json, os
from pathlib import Path


def model_fn(model_dir):
    if os.environ.get("TEST_BROKEN"):
        raise RuntimeError("this model is broken: " + os.environ["TEST_BROKEN"])
    return json.loads((Path(model_dir) / "model.json").read_text())


def input_fn(body, content_type):
    if content_type != "text/csv":
        raise ValueError(f"unsupported content type {content_type}")
    text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
    rows = [[float(x) for x in line.split(",")] for line in text.splitlines() if line.strip()]
    with open(os.environ["TEST_CALLS"], "a") as fh:
        fh.write(f"{len(rows)} {os.environ.get('SAGEMAKER_BATCH_STRATEGY')}\\n")
    return rows


def predict_fn(rows, model):
    if any(row[0] < 0 for row in rows):
        raise ValueError("negative feature: this model cannot predict it")
    return [model["scale"] * sum(row) for row in rows]


def output_fn(prediction, accept):
    return "\\n".join(f"{value:g}" for value in prediction)
'''

A_CSV = b"1,2\n3,4\n5,6\n"
B_CSV = b"10,20\n0.5,0.5"  # no final newline


@pytest.fixture
def store(tmp_path, monkeypatch) -> ArtifactStore:
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))
    store = ArtifactStore()
    store.put_bytes("s3://data/batch/a.csv", A_CSV)
    store.put_bytes("s3://data/batch/sub/b.csv", B_CSV)
    return store


def _model(store: ArtifactStore, tmp_path: Path, *, image: str = PYTORCH_IMAGE,
           environment: dict[str, str] | None = None) -> dict:
    """Upload a model.tar.gz (model.json + code/inference.py); return its DescribeModel answer."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in (("model.json", json.dumps({"scale": 1})), ("code/inference.py", HANDLER)):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    store.put_bytes("s3://models/tiny/model.tar.gz", buffer.getvalue())
    env = {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
           "TEST_CALLS": str(tmp_path / "calls.txt")} if environment is None else environment
    return {"ModelName": "tiny", "PrimaryContainer": {"Image": image, "ModelDataUrl": "s3://models/tiny/model.tar.gz",
                                                      "Environment": env}}


def _request(split: str = "Line", strategy: str = "MultiRecord", assemble: str = "Line", *,
             uri: str = "s3://data/batch/", **extra) -> dict:
    return {"ModelName": "tiny", "BatchStrategy": strategy, "MaxPayloadInMB": 6, "MaxConcurrentTransforms": 1,
            "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri}},
                               "ContentType": "text/csv", "SplitType": split, "CompressionType": "None"},
            "TransformOutput": {"S3OutputPath": "s3://out/preds/", "Accept": "text/csv", "AssembleWith": assemble},
            "TransformResources": {"InstanceType": "ml.m5.large", "InstanceCount": 1}, **extra}


def _run(store: ArtifactStore, tmp_path: Path, request: dict, model: dict, name: str = "tiny-transform") -> dict:
    (tmp_path / "calls.txt").unlink(missing_ok=True)
    shutil.rmtree(store.path("s3://out/preds"), ignore_errors=True)  # each run's outputs, not an earlier one's
    return run_transform_job(request, name, tmp_path / "runs" / name, store, tmp_path / f"{name}.log", model=model)


def _calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.txt").read_text().splitlines()


def _outputs(store: ArtifactStore) -> dict[str, bytes]:
    root = store.path("s3://out/preds")
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_line_split_multi_and_single_record_give_one_answer_per_line(store, tmp_path):
    model = _model(store, tmp_path)
    described = _run(store, tmp_path, _request(), model)
    expected = {"a.csv.out": b"3\n7\n11\n", "sub/b.csv.out": b"30\n1\n"}
    assert _outputs(store) == expected
    assert _calls(tmp_path) == ["3 MULTI_RECORD", "2 MULTI_RECORD"]  # one request per object
    assert described["TransformJobStatus"] == "Completed"
    assert described["TransformJobArn"] == _arn("transform-job", "tiny-transform")
    assert described["ModelName"] == "tiny" and described["BatchStrategy"] == "MultiRecord"
    assert described["TransformOutput"]["S3OutputPath"] == "s3://out/preds/"
    assert described["TransformResources"] == {"InstanceType": "ml.m5.large", "InstanceCount": 1}
    assert described["TransformStartTime"] <= described["TransformEndTime"]
    assert Path(described["LocalJobDir"]).is_dir()
    log = Path(described["LogPath"]).read_text()
    assert "[transform] 1/2 a.csv: 3 record(s) in 1 request(s)" in log
    assert "[transform] 2/2 sub/b.csv: 2 record(s) in 1 request(s)" in log

    _run(store, tmp_path, _request(strategy="SingleRecord", MaxConcurrentTransforms=3), model)
    assert _outputs(store) == expected  # the same answers, in order, with three requests in flight
    assert _calls(tmp_path) == ["1 SINGLE_RECORD"] * 5


def test_split_none_sends_the_whole_object(store, tmp_path):
    _run(store, tmp_path, _request(split="None", assemble="None"), _model(store, tmp_path))
    assert _outputs(store) == {"a.csv.out": b"3\n7\n11", "sub/b.csv.out": b"30\n1"}
    assert _calls(tmp_path) == ["3 MULTI_RECORD", "2 MULTI_RECORD"]


def test_single_object_uri_and_csv_join_with_filters(store, tmp_path):
    store.put_bytes("s3://data/ids/rows.csv", b"7,1,2\n8,3,4\n")
    request = _request(uri="s3://data/ids/rows.csv",
                       DataProcessing={"InputFilter": "$[1:]", "JoinSource": "Input", "OutputFilter": "$[0,-1]"})
    _run(store, tmp_path, request, _model(store, tmp_path))
    assert _outputs(store) == {"rows.csv.out": b"7,3\n8,7\n"}  # id column kept out of the model, joined back


def test_handler_error_fails_the_job_with_the_models_message(store, tmp_path):
    store.put_bytes("s3://data/batch/sub/b.csv", b"1,1\n-1,2\n")
    with pytest.raises(JobError) as info:
        _run(store, tmp_path, _request(), _model(store, tmp_path))
    message = str(info.value)
    assert "ModelError: sub/b.csv: the model answered HTTP 500" in message
    assert "negative feature: this model cannot predict it" in message
    assert _outputs(store) == {"a.csv.out": b"3\n7\n11\n"}  # only what was transformed completely

    with pytest.raises(JobError) as info:  # the request's Environment reaches the container: model_fn fails
        _run(store, tmp_path, _request(Environment={"TEST_BROKEN": "no weights"}), _model(store, tmp_path))
    assert "AlgorithmError: loading the model" in str(info.value)
    assert "RuntimeError: this model is broken: no weights" in str(info.value)
    assert _outputs(store) == {}


def test_unsupported_requests_and_models_fail_before_any_process(store, tmp_path):
    model = _model(store, tmp_path)
    for split in ("RecordIO", "TFRecord"):
        with pytest.raises(JobError, match=f"SplitType {split} is not supported by local batch transform"):
            _run(store, tmp_path, _request(split=split), model)
    with pytest.raises(JobError, match="image .*linear-learner:1 cannot be served locally.*XGBoost"):
        _run(store, tmp_path, _request(), _model(store, tmp_path, image=LINEAR_LEARNER_IMAGE, environment={}))
    with pytest.raises(JobError, match="JSONPath"):
        _run(store, tmp_path, _request(DataProcessing={"InputFilter": "$[?(@.a)]"}), model)
    with pytest.raises(JobError, match="needs CSV or JSON input"):
        _run(store, tmp_path, _request(DataProcessing={"JoinSource": "Input"}, TransformInput={
            "DataSource": {"S3DataSource": {"S3Uri": "s3://data/batch/"}}, "ContentType": "image/png"}), model)
    with pytest.raises(JobError, match="matches no object"):
        _run(store, tmp_path, _request(uri="s3://data/nothing-here/"), model)
    assert not (tmp_path / "calls.txt").exists()


def test_manifest_input(store, tmp_path):
    store.put_bytes("s3://data/inputs.manifest", json.dumps([{"prefix": "s3://data/batch/"}, "sub/b.csv"]).encode())
    request = _request(uri="s3://data/inputs.manifest")
    request["TransformInput"]["DataSource"]["S3DataSource"]["S3DataType"] = "ManifestFile"
    _run(store, tmp_path, request, _model(store, tmp_path))
    assert _outputs(store) == {"sub/b.csv.out": b"30\n1\n"}


# --- the platform's part, without a model process ----------------------------------------------------------------


def test_batches_respect_the_payload_limit():
    multi = TransformSettings(split_type="Line", max_payload_bytes=10)
    assert make_batches([4, 4, 4, 10], multi) == [[0, 1], [2], [3]]
    assert make_batches([4, 4], TransformSettings(split_type="Line", max_payload_bytes=0)) == [[0, 1]]
    single = TransformSettings(split_type="Line", batch_strategy="SingleRecord", max_payload_bytes=10)
    assert make_batches([4, 4], single) == [[0], [1]]
    with pytest.raises(JobError, match="over MaxPayloadInMB"):
        make_batches([4, 11], multi)


def _echo_lengths(body: bytes) -> bytes:
    """A stand-in model: one answer line per request line, the line's length."""
    return b"\n".join(str(len(line)).encode() for line in body.splitlines())


def test_json_lines_join_and_output_filter():
    settings = TransformSettings(split_type="Line", content_type="application/jsonlines",
                                 accept="application/jsonlines", assemble_with="Line", input_filter="$.features",
                                 join_source="Input", output_filter="$['id','SageMakerOutput']")
    data = b'{"id": 1, "features": [1, 2]}\n\n{"id": 2, "features": [3]}\n'
    out, records, requests = transform_object(_echo_lengths, data, settings)
    assert (records, requests) == (2, 1)  # the blank line is no record
    assert [json.loads(line) for line in out.splitlines()] == [{"id": 1, "SageMakerOutput": 6},
                                                               {"id": 2, "SageMakerOutput": 3}]
    scalars = TransformSettings(split_type="Line", content_type="application/jsonlines", join_source="Input")
    out, _, _ = transform_object(lambda body: b"[0.5]", b"[1, 2]\n", scalars)
    assert json.loads(out) == {"SageMakerInput": [1, 2], "SageMakerOutput": [0.5]}


def test_per_record_answers_must_match_the_records():
    settings = TransformSettings(split_type="Line", content_type="text/csv", join_source="Input")
    out, _, _ = transform_object(lambda body: b"[1, 2]", b"a\nb\n", settings)  # a JSON array: one per record
    assert out == b"a,1b,2"  # AssembleWith None: concatenated
    with pytest.raises(JobError, match="answered 1 line"):
        transform_object(lambda body: b"1", b"a\nb\n", settings)


def test_gzip_input_is_decompressed():
    import gzip

    settings = TransformSettings(split_type="Line", compression="Gzip", assemble_with="Line")
    assert transform_object(_echo_lengths, gzip.compress(b"abc\nde\n"), settings) == (b"3\n2\n", 2, 1)
    with pytest.raises(JobError, match="not gzip data"):
        transform_object(_echo_lengths, b"plain", settings)


def test_worker_usage():
    assert transform.main([]) == 2
