"""The local S3 service (pipelines/local/api/s3.py) driven by real clients: boto3's client and resource APIs,
s3transfer (``upload_file``/``download_file``: multipart and ranged GETs), paginators, presigned URLs. One service
process per module under a temporary MLOPS_HOME; each test works in buckets of its own.

A few tests speak raw HTTP where no SDK would send the request (path traversal, ``Expect: 100-continue`` refusals,
an aws-chunked body), because that is what the server has to survive."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import time
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import psutil
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.handlers import set_list_objects_encoding_type_url

from pipelines.local.api import server
from pipelines.local.storage.store import ArtifactStore

pytestmark = pytest.mark.fast

MB = 1024 * 1024


@pytest.fixture
def s3(local_aws_env):
    return boto3.client("s3")


@pytest.fixture
def bucket(s3):
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def artifacts(home: Path) -> Path:
    return home / "artifacts"


def error_of(excinfo: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    response = excinfo.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def signed_headers(**extra: str) -> dict[str, str]:
    """Headers that pass the server's scope check (it reads the credential scope; signatures are not verified)."""
    auth = ("AWS4-HMAC-SHA256 Credential=local/20240101/us-east-1/s3/aws4_request, SignedHeaders=host, "
            "Signature=" + "0" * 64)
    return {"Authorization": auth, "x-amz-date": "20240101T000000Z", **extra}


def raw_request(url: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=signed_headers(**(headers or {})))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------------- buckets


def test_clients_use_path_style_addressing(local_aws_env, s3, bucket):
    url, _ = local_aws_env
    seen: list[str] = []
    s3.meta.events.register("before-send.s3", lambda request, **_: seen.append(request.url))
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    assert seen == [f"{url}/{bucket}/k"]


def test_bucket_lifecycle(local_aws_env, s3):
    name = f"life-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    s3.create_bucket(Bucket=name)  # us-east-1: recreating your own bucket answers 200 (legacy), as AWS does
    assert name in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert s3.head_bucket(Bucket=name)["ResponseMetadata"]["HTTPHeaders"]["x-amz-bucket-region"] == "us-east-1"
    assert s3.get_bucket_location(Bucket=name)["LocationConstraint"] is None
    other_region = boto3.client("s3", region_name="eu-west-1")
    with pytest.raises(ClientError) as excinfo:
        other_region.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    assert error_of(excinfo) == ("BucketAlreadyOwnedByYou", 409)
    s3.put_object(Bucket=name, Key="deep/er/key", Body=b"x")
    with pytest.raises(ClientError) as excinfo:
        s3.delete_bucket(Bucket=name)
    assert error_of(excinfo) == ("BucketNotEmpty", 409)
    s3.delete_object(Bucket=name, Key="deep/er/key")
    s3.delete_bucket(Bucket=name)
    assert not (artifacts(local_aws_env[1]) / name).exists()
    with pytest.raises(ClientError) as excinfo:
        s3.head_bucket(Bucket=name)
    assert error_of(excinfo) == ("404", 404)  # HEAD errors have no body: botocore reports the status
    with pytest.raises(ClientError) as excinfo:
        s3.list_objects_v2(Bucket=name)
    assert error_of(excinfo) == ("NoSuchBucket", 404)


def test_invalid_bucket_names_are_refused(s3):
    for name in ("ab", "Upper-Case", "under_score", "a..b", "192.168.0.1"):
        with pytest.raises(ClientError) as excinfo:
            s3.create_bucket(Bucket=name)
        assert error_of(excinfo) == ("InvalidBucketName", 400), name


def test_list_buckets_paginates(local_aws_env, s3):
    prefix = f"pg{uuid.uuid4().hex[:6]}-"
    for index in range(3):
        s3.create_bucket(Bucket=f"{prefix}{index}")
    pages = list(s3.get_paginator("list_buckets").paginate(Prefix=prefix, PaginationConfig={"PageSize": 2}))
    assert [[b["Name"] for b in page["Buckets"]] for page in pages] == [[f"{prefix}0", f"{prefix}1"], [f"{prefix}2"]]


# ----------------------------------------------------------------------------------------------------- objects


def test_put_get_head_delete(s3, bucket):
    data = b"hello local s3"
    put = s3.put_object(Bucket=bucket, Key="dir/hello.txt", Body=data, ContentType="text/plain",
                        Metadata={"Owner": "tests", "run": "42"}, CacheControl="no-cache")
    assert put["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    got = s3.get_object(Bucket=bucket, Key="dir/hello.txt")
    assert got["Body"].read() == data
    assert (got["ContentType"], got["ContentLength"], got["ETag"]) == ("text/plain", len(data), put["ETag"])
    assert got["Metadata"] == {"owner": "tests", "run": "42"}
    assert got["CacheControl"] == "no-cache"
    assert got["ChecksumCRC32"]  # the CRC32 botocore sent was verified, stored, and validated again on the way back
    head = s3.head_object(Bucket=bucket, Key="dir/hello.txt")
    assert (head["ContentLength"], head["ETag"], head["AcceptRanges"]) == (len(data), put["ETag"], "bytes")
    assert abs(head["LastModified"].timestamp() - time.time()) < 60
    assert s3.put_object(Bucket=bucket, Key="empty", Body=b"")["ETag"] == f'"{hashlib.md5(b"").hexdigest()}"'
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""
    s3.delete_object(Bucket=bucket, Key="dir/hello.txt")
    s3.delete_object(Bucket=bucket, Key="never-existed")  # S3 answers 204 either way
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="dir/hello.txt")
    assert error_of(excinfo) == ("NoSuchKey", 404)
    assert excinfo.value.response["Error"]["Key"] == "dir/hello.txt"
    with pytest.raises(ClientError) as excinfo:
        s3.head_object(Bucket=bucket, Key="dir/hello.txt")
    assert error_of(excinfo) == ("404", 404)
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket="no-such-bucket-here", Key="k")
    assert error_of(excinfo) == ("NoSuchBucket", 404)


def test_resource_api(local_aws_env, bucket):
    s3r = boto3.resource("s3")
    b = s3r.Bucket(bucket)
    b.put_object(Key="r/one.json", Body=b"{}", ContentType="application/json")
    b.Object("r/two.bin").put(Body=b"\x00\x01")
    assert sorted(o.key for o in b.objects.filter(Prefix="r/")) == ["r/one.json", "r/two.bin"]
    obj = s3r.Object(bucket, "r/one.json")
    assert (obj.content_type, obj.content_length) == ("application/json", 2)
    assert obj.get()["Body"].read() == b"{}"
    s3r.Object(bucket, "r/copy.json").copy_from(CopySource={"Bucket": bucket, "Key": "r/one.json"})
    assert s3r.Object(bucket, "r/copy.json").get()["Body"].read() == b"{}"
    b.objects.all().delete()  # DeleteObjects
    assert list(b.objects.all()) == []


def test_objects_are_the_artifact_files(local_aws_env, s3, bucket):
    home = local_aws_env[1]
    s3.put_object(Bucket=bucket, Key="models/run 1/model.tar.gz", Body=b"weights")
    path = artifacts(home) / bucket / "models" / "run 1" / "model.tar.gz"
    assert path.read_bytes() == b"weights"
    assert [p.name for p in path.parent.iterdir()] == ["model.tar.gz"]  # no temp files, metadata kept elsewhere
    assert ArtifactStore().path(f"s3://{bucket}/models/run 1/model.tar.gz") == path

    # what the engine writes -- a single file and whole output directories -- is an object, every file a key
    store = ArtifactStore()
    store.put_bytes(f"s3://{bucket}/engine/metrics.json", b'{"acc": 1}')
    output = home / "job-output"
    (output / "sub" / "deeper").mkdir(parents=True)
    (output / "a.txt").write_bytes(b"a")
    (output / "sub" / "b.txt").write_bytes(b"bb")
    (output / "sub" / "deeper" / "c.txt").write_bytes(b"ccc")
    store.copy_in(output, f"s3://{bucket}/engine/output")
    got = s3.get_object(Bucket=bucket, Key="engine/metrics.json")
    assert got["Body"].read() == b'{"acc": 1}'
    assert got["ETag"] == '"' + hashlib.md5(b'{"acc": 1}').hexdigest() + '"'
    assert got["ContentType"] == "binary/octet-stream"
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="engine/")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [
        ("engine/metrics.json", 10), ("engine/output/a.txt", 1), ("engine/output/sub/b.txt", 2),
        ("engine/output/sub/deeper/c.txt", 3)]
    assert s3.head_object(Bucket=bucket, Key="engine/output/sub/deeper/c.txt")["ETag"] == listed[-1]["ETag"]

    # the engine rewriting a file invalidates what the API stored about it
    path.write_bytes(b"new weights")
    head = s3.head_object(Bucket=bucket, Key="models/run 1/model.tar.gz")
    assert (head["ContentLength"], head["ETag"]) == (11, f'"{hashlib.md5(b"new weights").hexdigest()}"')


def test_copy_object(s3, bucket):
    s3.put_object(Bucket=bucket, Key="src", Body=b"payload", ContentType="text/csv", Metadata={"a": "1"})
    result = s3.copy_object(Bucket=bucket, Key="dst/copy", CopySource={"Bucket": bucket, "Key": "src"})
    assert result["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(b"payload").hexdigest()}"'
    copied = s3.get_object(Bucket=bucket, Key="dst/copy")
    assert (copied["Body"].read(), copied["ContentType"], copied["Metadata"]) == (b"payload", "text/csv", {"a": "1"})
    s3.copy_object(Bucket=bucket, Key="dst/replaced", CopySource=f"{bucket}/src", MetadataDirective="REPLACE",
                   ContentType="text/plain", Metadata={"b": "2"})
    replaced = s3.head_object(Bucket=bucket, Key="dst/replaced")
    assert (replaced["ContentType"], replaced["Metadata"]) == ("text/plain", {"b": "2"})
    with pytest.raises(ClientError) as excinfo:
        s3.copy_object(Bucket=bucket, Key="src", CopySource={"Bucket": bucket, "Key": "src"})
    assert error_of(excinfo) == ("InvalidRequest", 400)
    with pytest.raises(ClientError) as excinfo:
        s3.copy_object(Bucket=bucket, Key="x", CopySource={"Bucket": bucket, "Key": "missing"})
    assert error_of(excinfo) == ("NoSuchKey", 404)
    with pytest.raises(ClientError) as excinfo:
        s3.copy_object(Bucket=bucket, Key="x", CopySource={"Bucket": bucket, "Key": "src"}, CopySourceIfMatch='"0"')
    assert error_of(excinfo) == ("PreconditionFailed", 412)


def test_ranged_and_conditional_gets(s3, bucket):
    data = bytes(range(10))
    etag = s3.put_object(Bucket=bucket, Key="r", Body=data)["ETag"]
    for header, expected, content_range in [("bytes=0-0", data[:1], "bytes 0-0/10"),
                                            ("bytes=3-5", data[3:6], "bytes 3-5/10"),
                                            ("bytes=7-", data[7:], "bytes 7-9/10"),
                                            ("bytes=-3", data[-3:], "bytes 7-9/10"),
                                            ("bytes=8-100", data[8:], "bytes 8-9/10")]:
        got = s3.get_object(Bucket=bucket, Key="r", Range=header)
        assert got["ResponseMetadata"]["HTTPStatusCode"] == 206, header
        assert (got["Body"].read(), got["ContentRange"], got["ContentLength"]) == (expected, content_range,
                                                                                   len(expected))
    assert s3.get_object(Bucket=bucket, Key="r", Range="bytes=5-2")["Body"].read() == data  # invalid: ignored
    for unsatisfiable in ("bytes=10-", "bytes=50-60", "bytes=-0"):
        with pytest.raises(ClientError) as excinfo:
            s3.get_object(Bucket=bucket, Key="r", Range=unsatisfiable)
        assert error_of(excinfo) == ("InvalidRange", 416)
        assert excinfo.value.response["Error"]["ActualObjectSize"] == "10"
    assert s3.get_object(Bucket=bucket, Key="r", IfMatch=etag)["Body"].read() == data
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="r", IfMatch='"deadbeef"')
    assert error_of(excinfo) == ("PreconditionFailed", 412)
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="r", IfNoneMatch=etag)
    assert error_of(excinfo) == ("304", 304)
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="r", Body=b"again", IfNoneMatch="*")
    assert error_of(excinfo) == ("PreconditionFailed", 412)


def test_presigned_url(local_aws_env, s3, bucket):
    """SigV4 presigned URLs (botocore presigns S3 with SigV2 unless told s3v4; the server needs a SigV4 scope)."""
    s3.put_object(Bucket=bucket, Key="shared/file.txt", Body=b"presigned")
    presigner = boto3.client("s3", config=Config(signature_version="s3v4"))
    url = presigner.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "shared/file.txt"})
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 -- the local service
        assert response.read() == b"presigned"


ODD_KEYS = ["with space.txt", "plus+sign", "percent%20literal", "ünïcödé/日本語.txt", "q?mark", "hash#tag",
            "amp&er=sand;x", "tilde~", "quote'\"s", "angle<>brackets", "emoji/🙂", "trailing space ", "a+b c%2Fd"]


def test_odd_keys_round_trip(s3, bucket):
    for key in ODD_KEYS:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    for key in ODD_KEYS:
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == key.encode(), key
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(key.encode())
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]  # encoding-type=url, decoded by boto3
    assert listed == sorted(ODD_KEYS, key=lambda k: k.encode())
    assert [o["Key"] for o in s3.list_objects(Bucket=bucket)["Contents"]] == listed
    raw = boto3.client("s3")  # without encoding-type=url: keys as XML text
    raw.meta.events.unregister("before-parameter-build.s3.ListObjectsV2", set_list_objects_encoding_type_url)
    assert [o["Key"] for o in raw.list_objects_v2(Bucket=bucket)["Contents"]] == listed
    s3.copy_object(Bucket=bucket, Key="copies/" + ODD_KEYS[3], CopySource={"Bucket": bucket, "Key": ODD_KEYS[3]})
    assert s3.get_object(Bucket=bucket, Key="copies/" + ODD_KEYS[3])["Body"].read() == ODD_KEYS[3].encode()
    deleted = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in ODD_KEYS]})
    assert sorted(d["Key"] for d in deleted["Deleted"]) == sorted(ODD_KEYS)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["copies/" + ODD_KEYS[3]]


def test_bad_keys_are_refused(local_aws_env, s3, bucket):
    url, home = local_aws_env
    root = artifacts(home)
    before = {p for p in home.rglob("*")}
    for key in ("../escape", "a/../../escape", "/absolute", "a//b", "a/./b", "..", f"x/{'.s3tmp-'}y"):
        with pytest.raises(ClientError) as excinfo:
            s3.put_object(Bucket=bucket, Key=key, Body=b"x")
        assert error_of(excinfo) == ("InvalidArgument", 400), key
        with pytest.raises(ClientError):
            s3.get_object(Bucket=bucket, Key=key)
    # what no SDK sends: percent-encoded dot segments, traversal in the bucket part, a symlink out of the store
    outside = home / "outside.txt"
    outside.write_bytes(b"secret")
    (root / bucket / "link").symlink_to(outside)
    for method, path in [("PUT", f"/{bucket}/%2e%2e/%2e%2e/escape"), ("PUT", "/%2e%2e/escape"),
                         ("GET", f"/{bucket}/%2e%2e/%2e%2e/outside.txt"), ("GET", "/%2e%2e/outside.txt"),
                         ("GET", f"/{bucket}/link"), ("PUT", f"/{bucket}/link"), ("GET", "/..%2Foutside.txt/x")]:
        status, body = raw_request(url, method, path, b"x" if method == "PUT" else b"")
        assert status >= 400 and b"secret" not in body, (method, path, status, body)
    assert {p for p in home.rglob("*")} - before == {outside, root / bucket / "link"}
    assert outside.read_bytes() == b"secret"
    assert "link" not in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_key_that_is_a_prefix_of_others_conflicts(s3, bucket):
    s3.put_object(Bucket=bucket, Key="a/b", Body=b"x")
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="a", Body=b"y")
    assert error_of(excinfo) == ("KeyConflict", 409)
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="a/b/c", Body=b"z")
    assert error_of(excinfo) == ("KeyConflict", 409)
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="a")  # a directory is not an object
    assert error_of(excinfo) == ("NoSuchKey", 404)


def test_directory_markers(local_aws_env, s3, bucket):
    s3.put_object(Bucket=bucket, Key="folder/", Body=b"")
    assert s3.head_object(Bucket=bucket, Key="folder/")["ContentLength"] == 0
    s3.put_object(Bucket=bucket, Key="folder/file", Body=b"f")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["folder/", "folder/file"]
    s3.delete_object(Bucket=bucket, Key="folder/file")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["folder/"]
    s3.delete_object(Bucket=bucket, Key="folder/")
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
    assert list((artifacts(local_aws_env[1]) / bucket).iterdir()) == []  # emptied prefixes do not linger as directories


def test_checksums_and_md5_are_verified(s3, bucket):
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="k", Body=b"data", ChecksumCRC32="AAAAAA==")
    assert error_of(excinfo) == ("BadDigest", 400)
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="k", Body=b"data", ContentMD5="1B2M2Y8AsgTpgAmY7PhCfg==")
    assert error_of(excinfo) == ("BadDigest", 400)
    s3.put_object(Bucket=bucket, Key="k", Body=b"data", ChecksumAlgorithm="SHA256")
    got = s3.get_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")
    assert got["ChecksumSHA256"] == "Om6weQ85rIfJTzhWst0sXREOaBFgImGpqSPTuyOtyLc="
    assert "Contents" in s3.list_objects_v2(Bucket=bucket)


def test_aws_chunked_body_with_trailing_checksum(local_aws_env, s3, bucket):
    """What SDKs send over HTTPS (boto3 does not over plain HTTP): aws-chunked framing, the checksum in a trailer."""
    payload = os.urandom(70_000)
    crc = zlib.crc32(payload).to_bytes(4, "big")

    def framed(checksum: bytes) -> bytes:
        chunks = [payload[:65536], payload[65536:]]
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        return body + b"0\r\nx-amz-checksum-crc32:" + base64.b64encode(checksum) + b"\r\n\r\n"

    headers = {"Content-Encoding": "aws-chunked", "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
               "x-amz-decoded-content-length": str(len(payload)), "x-amz-trailer": "x-amz-checksum-crc32"}
    status, body = raw_request(local_aws_env[0], "PUT", f"/{bucket}/chunked", framed(crc), headers)
    assert status == 200, body
    got = s3.get_object(Bucket=bucket, Key="chunked")
    assert got["Body"].read() == payload
    assert "ContentEncoding" not in got  # aws-chunked is transport framing, not stored
    status, body = raw_request(local_aws_env[0], "PUT", f"/{bucket}/chunked", framed(b"\0\0\0\0"), headers)
    assert status == 400 and b"BadDigest" in body


def test_expect_100_continue(local_aws_env, bucket):
    """``100 Continue`` only once the service reads the body: a refused upload is answered before it is sent."""
    host, port = local_aws_env[0].removeprefix("http://").split(":")
    for path, first_line in [("/no-such-bucket-x/k", b"HTTP/1.1 404"), (f"/{bucket}/k", b"HTTP/1.1 100")]:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.putrequest("PUT", path, skip_accept_encoding=True)
        for name, value in signed_headers(**{"Content-Length": "5", "Expect": "100-continue"}).items():
            conn.putheader(name, value)
        conn.endheaders()
        reply = conn.sock.recv(65536)
        assert reply.startswith(first_line), reply
        if first_line.endswith(b"100"):
            conn.sock.sendall(b"hello")
            deadline = time.monotonic() + 10
            while b"HTTP/1.1 200" not in reply and time.monotonic() < deadline:
                reply += conn.sock.recv(65536)
            assert b"HTTP/1.1 200" in reply
        conn.close()


# ----------------------------------------------------------------------------------------------------- listing


def test_listing_prefixes_delimiters_and_v1(s3, bucket):
    keys = ["a.txt", "b/1", "b/2", "b/c/3", "b-side", "c/d/e/f", "z"]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    listed = s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == sorted(keys) and listed["KeyCount"] == len(keys)
    top = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [o["Key"] for o in top["Contents"]] == ["a.txt", "b-side", "z"]
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["b/", "c/"]
    assert top["KeyCount"] == 5
    under_b = s3.list_objects_v2(Bucket=bucket, Prefix="b/", Delimiter="/")
    assert [o["Key"] for o in under_b["Contents"]] == ["b/1", "b/2"]
    assert [p["Prefix"] for p in under_b["CommonPrefixes"]] == ["b/c/"]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="b")["Contents"]] == [
        "b-side", "b/1", "b/2", "b/c/3"]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, StartAfter="b/2")["Contents"]] == [
        "b/c/3", "c/d/e/f", "z"]
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="nothing/")
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="../")
    dashes = s3.list_objects_v2(Bucket=bucket, Delimiter="-")
    assert [p["Prefix"] for p in dashes["CommonPrefixes"]] == ["b-"]
    v1 = s3.list_objects(Bucket=bucket, Delimiter="/", MaxKeys=3)  # "b-side" < "b/": '-' sorts before '/'
    assert [o["Key"] for o in v1["Contents"]] == ["a.txt", "b-side"]
    assert [p["Prefix"] for p in v1["CommonPrefixes"]] == ["b/"]
    assert v1["IsTruncated"] and v1["NextMarker"] == "b/"
    rest = s3.list_objects(Bucket=bucket, Delimiter="/", Marker="b/")
    assert [o["Key"] for o in rest["Contents"]] == ["z"] and [p["Prefix"] for p in rest["CommonPrefixes"]] == ["c/"]
    pages = list(s3.get_paginator("list_objects").paginate(Bucket=bucket, Delimiter="/",
                                                           PaginationConfig={"PageSize": 2}))
    assert [o["Key"] for p in pages for o in p.get("Contents", [])] == ["a.txt", "b-side", "z"]
    assert [c["Prefix"] for p in pages for c in p.get("CommonPrefixes", [])] == ["b/", "c/"]


def test_pagination_of_2500_keys(s3, bucket):
    keys = [f"data/{i % 7}/item-{i:05d}.bin" for i in range(2500)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=key.encode()), keys))
    pages = list(s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="data/"))
    assert [page["KeyCount"] for page in pages] == [1000, 1000, 500]
    assert [page["IsTruncated"] for page in pages] == [True, True, False]
    assert all("NextContinuationToken" in page for page in pages[:2])
    assert [o["Key"] for page in pages for o in page["Contents"]] == sorted(keys)
    # common prefixes page too, each returned once
    grouped = list(s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="data/", Delimiter="/",
                                                                PaginationConfig={"PageSize": 3}))
    assert [[p["Prefix"] for p in page["CommonPrefixes"]] for page in grouped] == [
        ["data/0/", "data/1/", "data/2/"], ["data/3/", "data/4/", "data/5/"], ["data/6/"]]
    v1_keys = [o["Key"] for page in s3.get_paginator("list_objects").paginate(Bucket=bucket) for o in page["Contents"]]
    assert v1_keys == sorted(keys)


# --------------------------------------------------------------------------------------------------- multipart


def test_upload_file_multipart_and_ranged_download(local_aws_env, s3, bucket, tmp_path):
    home = local_aws_env[1]
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(20 * MB + 12345))
    config = TransferConfig(multipart_threshold=5 * MB, max_concurrency=4)  # 8 MB parts: 8 + 8 + 4
    s3.upload_file(str(source), bucket, "datasets/big.bin", Config=config, ExtraArgs={"Metadata": {"kind": "big"}})
    head = s3.head_object(Bucket=bucket, Key="datasets/big.bin")
    data = source.read_bytes()
    parts = [data[i:i + 8 * MB] for i in range(0, len(data), 8 * MB)]
    expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + f"-{len(parts)}"
    assert head["ETag"] == f'"{expected}"' and head["ContentLength"] == len(data)
    assert head["Metadata"] == {"kind": "big"}
    stored = artifacts(home) / bucket / "datasets" / "big.bin"
    assert stored.read_bytes() == data
    assert [p.name for p in stored.parent.iterdir()] == ["big.bin"]  # no assembly or part files left behind
    ranges: list[str] = []
    s3.meta.events.register("before-send.s3.GetObject", lambda request, **_: ranges.append(request.headers["Range"]))
    target = tmp_path / "back.bin"
    s3.download_file(bucket, "datasets/big.bin", str(target), Config=config)
    assert target.read_bytes() == data
    assert len(ranges) == 3  # s3transfer's ranged GETs (with If-Match on the ETag)


def test_multipart_parts_out_of_order_and_of_odd_sizes(s3, bucket):
    key = "mp/odd"
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType="application/x-odd")["UploadId"]
    blobs = {1: os.urandom(6 * MB), 2: os.urandom(5 * MB), 3: b"tail"}
    etags = {}
    for number in (3, 2, 1):  # the small last part arrives first and sets the "part size": the slow path
        etags[number] = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                       Body=blobs[number])["ETag"]
    listed = s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
    assert [(p["PartNumber"], p["Size"], p["ETag"]) for p in listed] == [
        (n, len(blobs[n]), etags[n]) for n in (1, 2, 3)]
    with pytest.raises(ClientError) as excinfo:
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]})
    assert error_of(excinfo) == ("InvalidPart", 400)
    with pytest.raises(ClientError) as excinfo:
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={
            "Parts": [{"PartNumber": 3, "ETag": etags[3]}, {"PartNumber": 1, "ETag": etags[1]}]})
    assert error_of(excinfo) == ("InvalidPartOrder", 400)
    done = s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": etags[n]} for n in (1, 2, 3)]})
    md5s = b"".join(hashlib.md5(blobs[n]).digest() for n in (1, 2, 3))
    assert done["ETag"] == f'"{hashlib.md5(md5s).hexdigest()}-3"'
    got = s3.get_object(Bucket=bucket, Key=key)
    assert got["Body"].read() == blobs[1] + blobs[2] + blobs[3]
    assert got["ContentType"] == "application/x-odd"


def test_multipart_errors_and_abort(local_aws_env, s3, bucket):
    key = "mp/abort"
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    small = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"too small")["ETag"]
    last = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=2, Body=b"last")["ETag"]
    with pytest.raises(ClientError) as excinfo:
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": small}, {"PartNumber": 2, "ETag": last}]})
    assert error_of(excinfo) == ("EntityTooSmall", 400)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)  # in-progress upload files never list
    s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    with pytest.raises(ClientError) as excinfo:
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x")
    assert error_of(excinfo) == ("NoSuchUpload", 404)
    with pytest.raises(ClientError) as excinfo:
        s3.list_parts(Bucket=bucket, Key=key, UploadId="nope")
    assert error_of(excinfo) == ("NoSuchUpload", 404)
    assert list((artifacts(local_aws_env[1]) / bucket).iterdir()) == []


def test_upload_part_copy(s3, bucket):
    source = os.urandom(6 * MB)
    s3.put_object(Bucket=bucket, Key="src.bin", Body=source)
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="dst.bin")["UploadId"]
    copy = {"Bucket": bucket, "Key": "dst.bin", "UploadId": upload_id,
            "CopySource": {"Bucket": bucket, "Key": "src.bin"}}
    first = s3.upload_part_copy(**copy, PartNumber=1, CopySourceRange=f"bytes=0-{5 * MB - 1}")
    with pytest.raises(ClientError) as excinfo:  # S3 wants bytes=first-last here
        s3.upload_part_copy(**copy, PartNumber=2, CopySourceRange=f"bytes={5 * MB}-")
    assert error_of(excinfo) == ("InvalidArgument", 400)
    second = s3.upload_part_copy(**copy, PartNumber=2, CopySourceRange=f"bytes={5 * MB}-{6 * MB - 1}")
    s3.complete_multipart_upload(Bucket=bucket, Key="dst.bin", UploadId=upload_id, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": first["CopyPartResult"]["ETag"]},
        {"PartNumber": 2, "ETag": second["CopyPartResult"]["ETag"]}]})
    assert s3.get_object(Bucket=bucket, Key="dst.bin")["Body"].read() == source


def test_large_put_and_get_stream_at_bounded_server_memory(local_aws_env, s3, bucket, tmp_path):
    """A 96 MB single PUT and GET go through the server without it holding the object in memory."""
    pid = server.status()["pid"]
    process = psutil.Process(pid)
    source = tmp_path / "single.bin"
    source.write_bytes(os.urandom(96 * MB))
    config = TransferConfig(multipart_threshold=1024 * MB)  # one PutObject, one GetObject
    baseline = process.memory_info().rss
    s3.upload_file(str(source), bucket, "single.bin", Config=config)
    s3.download_file(bucket, "single.bin", str(tmp_path / "back.bin"), Config=config)
    growth = process.memory_info().rss - baseline
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
    assert growth < 48 * MB, f"server RSS grew by {growth / MB:.0f} MB"


def test_operation_hint_in_query_is_not_a_subresource(local_aws_env, s3, bucket):
    """Newer SDKs send ``?x-id=GetObject`` (and so on): an argument, not another API."""
    s3.put_object(Bucket=bucket, Key="k", Body=b"x-id")
    status, body = raw_request(local_aws_env[0], "GET", f"/{bucket}/k?x-id=GetObject")
    assert (status, body) == (200, b"x-id")


def test_unimplemented_apis_answer_not_implemented(s3, bucket):
    with pytest.raises(ClientError) as excinfo:
        s3.get_bucket_policy(Bucket=bucket)
    assert error_of(excinfo) == ("NotImplemented", 501)
    assert s3.get_bucket_versioning(Bucket=bucket).get("Status") is None
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="k", PartNumber=1)
    assert error_of(excinfo) == ("NotImplemented", 501)
