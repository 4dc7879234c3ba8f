"""Storage layer against a real S3 protocol endpoint (moto server mode) and the local filesystem."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer import storage
from finetune_trainer.storage import (
    COMPLETE_MARKER,
    IntegrityError,
    Storage,
    StorageError,
    StorageNotFound,
    StorageUserError,
    parse_uri,
)

MiB = 1024 * 1024


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.make_bucket()


@pytest.fixture
def store(s3_server) -> Storage:
    return Storage()  # everything from the environment the s3_server fixture set, as in a trainer pod


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# ---- URIs ----------------------------------------------------------------------------------------------


def test_parse_uri_kinds(tmp_path: Path) -> None:
    s3 = parse_uri("s3://bkt/a/b.txt")
    assert (s3.bucket, s3.key, s3.prefix) == ("bkt", "a/b.txt", "a/b.txt/")
    assert parse_uri("file:///data/x%20y.jsonl").local == Path("/data/x y.jsonl")
    assert parse_uri(str(tmp_path)).local == tmp_path
    with pytest.raises(StorageError, match="unsupported URI scheme 'hf'"):
        parse_uri("hf://org/model")
    with pytest.raises(StorageError, match="no bucket name"):
        parse_uri("s3:///key")


# ---- single objects ------------------------------------------------------------------------------------


def test_upload_download_roundtrip_records_sha256(store: Storage, bucket: str, s3_server, tmp_path: Path) -> None:
    data = os.urandom(70_000)
    src = tmp_path / "weights.bin"
    src.write_bytes(data)
    uri = f"s3://{bucket}/run/weights.bin"

    rec = store.upload_file(src, uri)

    assert (rec.path, rec.size, rec.sha256, rec.uri) == ("weights.bin", len(data), _sha(data), uri)
    head = s3_server.client().head_object(Bucket=bucket, Key="run/weights.bin")
    assert head["Metadata"]["sha256"] == _sha(data)  # stored so a later download can verify end to end
    out = store.download_file(uri, tmp_path / "dl" / "w.bin")
    assert out.read_bytes() == data
    assert [p.name for p in out.parent.iterdir()] == ["w.bin"]  # no temporary file left behind


def test_multipart_transfer_both_ways(s3_server, bucket: str, tmp_path: Path) -> None:
    # 5 MiB is S3's minimum part size; 11 MiB -> 3 parts up, 3 ranged GETs down.
    store = Storage(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2, download_chunksize=5 * MiB
    )
    data = os.urandom(11 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = f"s3://{bucket}/big.bin"

    rec = store.upload_file(src, uri)

    etag = s3_server.client().head_object(Bucket=bucket, Key="big.bin")["ETag"].strip('"')
    assert etag.endswith("-3"), f"expected a 3-part multipart upload, got ETag {etag}"
    assert rec.size == len(data)
    assert store.download_file(uri, tmp_path / "back.bin").read_bytes() == data


def test_download_detects_sha256_mismatch(store: Storage, bucket: str, s3_server, tmp_path: Path) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="bad.bin", Body=b"abc", Metadata={"sha256": _sha(b"xyz")})
    dest = tmp_path / "bad.bin"
    with pytest.raises(IntegrityError, match=rf"s3://{bucket}/bad.bin: sha256 mismatch"):
        store.download_file(f"s3://{bucket}/bad.bin", dest)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one


def test_text_roundtrip_and_exists(store: Storage, bucket: str) -> None:
    uri = f"s3://{bucket}/job/manifest.json"
    assert not store.exists(uri)
    rec = store.write_text(uri, '{"ok": "ünïcode"}')
    assert rec.sha256 == _sha('{"ok": "ünïcode"}'.encode())
    assert store.read_text(uri) == '{"ok": "ünïcode"}'
    assert store.exists(uri)
    assert store.exists(f"s3://{bucket}/job")  # a "directory" with something in it
    assert store.exists(f"s3://{bucket}/job/")
    assert not store.exists(f"s3://{bucket}/jo")  # a prefix of a name is not a directory


def test_explicit_endpoint_and_region_win_over_environment(
    s3_server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: would fail if used
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    store = Storage(endpoint=s3_server.endpoint, region="us-east-1")
    store.write_text(f"s3://{bucket}/x.txt", "hi")
    assert store.read_text(f"s3://{bucket}/x.txt") == "hi"
    assert store.region == "us-east-1"


# ---- prefixes ------------------------------------------------------------------------------------------


def test_upload_dir_list_download_delete(store: Storage, bucket: str, tmp_path: Path) -> None:
    files = {"config.json": b"{}", "model.safetensors": b"w" * 1000, "tok/vocab.json": b'{"a": 1}'}
    src = _tree(tmp_path / "model", files)
    _tree(tmp_path / "sibling", {"other.txt": b"keep me"})
    store.upload_dir(tmp_path / "sibling", f"s3://{bucket}/run10")

    records = store.upload_dir(src, f"s3://{bucket}/run1/")

    assert [(r.path, r.size, r.sha256) for r in records] == [(k, len(v), _sha(v)) for k, v in sorted(files.items())]
    assert records[2].uri == f"s3://{bucket}/run1/tok/vocab.json"
    # "run1" must not pick up "run10/..."
    assert store.list_prefix(f"s3://{bucket}/run1") == sorted(files)
    paths = store.download_prefix(f"s3://{bucket}/run1", tmp_path / "dl")
    assert {p.relative_to(tmp_path / "dl").as_posix(): p.read_bytes() for p in paths} == files

    assert store.delete_prefix(f"s3://{bucket}/run1") == 3
    assert store.list_prefix(f"s3://{bucket}/run1") == []
    assert store.list_prefix(f"s3://{bucket}/run10") == ["other.txt"]


def test_delete_prefix_pages_past_1000_keys(store: Storage, bucket: str, s3_server) -> None:
    client = s3_server.client()
    for i in range(1003):
        client.put_object(Bucket=bucket, Key=f"ckpt/{i:04d}", Body=b"")
    assert len(store.list_prefix(f"s3://{bucket}/ckpt")) == 1003  # list paginates (1000 per page)
    assert store.delete_prefix(f"s3://{bucket}/ckpt/") == 1003
    assert not store.exists(f"s3://{bucket}/ckpt/")


def test_download_prefix_of_nothing_names_the_uri(store: Storage, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageNotFound, match=rf"s3://{bucket}/nothing/: no files under this prefix"):
        store.download_prefix(f"s3://{bucket}/nothing/", tmp_path)


# ---- local files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_uri", [True, False], ids=["file-uri", "plain-path"])
def test_local_backend_same_api(tmp_path: Path, as_uri: bool) -> None:
    store = Storage()
    root = tmp_path / "out"
    base = root.as_uri() if as_uri else str(root)
    src = _tree(tmp_path / "src", {"a.txt": b"A", "sub/b.txt": b"BB"})

    records = store.upload_dir(src, base + "/model")
    assert [(r.path, r.size) for r in records] == [("a.txt", 1), ("sub/b.txt", 2)]
    assert store.list_prefix(base + "/model") == ["a.txt", "sub/b.txt"]
    assert store.exists(base + "/model/sub/b.txt")
    store.write_text(base + "/manifest.json", "{}")
    assert store.read_text(base + "/manifest.json") == "{}"
    assert store.download_file(base + "/model/sub/b.txt", tmp_path / "b.txt").read_bytes() == b"BB"
    assert store.delete_prefix(base + "/model") == 2
    assert not store.exists(base + "/model")
    with pytest.raises(StorageNotFound, match="no such file"):
        store.read_text(base + "/missing.json")


# ---- errors name the URI and what to check, never the credentials --------------------------------------


def test_missing_bucket_and_missing_key_are_told_apart(store: Storage, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageNotFound) as exc:
        store.download_file("s3://no-such-bucket-xyz/data/train.jsonl", tmp_path / "t")
    msg = str(exc.value)
    assert "s3://no-such-bucket-xyz/data/train.jsonl" in msg
    assert "bucket 'no-such-bucket-xyz' does not exist" in msg and "spec.storage.endpoint" in msg

    with pytest.raises(StorageNotFound, match=rf"s3://{bucket}/nope.jsonl: no such object .* check the key"):
        store.download_file(f"s3://{bucket}/nope.jsonl", tmp_path / "t")
    with pytest.raises(StorageNotFound, match="bucket 'no-such-bucket-xyz' does not exist"):
        store.read_text("s3://no-such-bucket-xyz/x.txt")
    with pytest.raises(StorageNotFound, match="does not exist"):
        store.exists("s3://no-such-bucket-xyz/x.txt")
    with pytest.raises(StorageNotFound, match="does not exist"):
        store.upload_file(tmp_path / "never-written", f"s3://{bucket}/x")


def test_upload_to_missing_bucket(store: Storage, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(
        StorageNotFound, match=r"upload s3://no-such-bucket-up/f: bucket .no-such-bucket-up. does not exist"
    ):
        store.upload_file(tmp_path / "f", "s3://no-such-bucket-up/f")


# ---- faults: what heals is retried with backoff up to a deadline, what cannot fails fast as a user error ----

UNREACHABLE_BOUND_S = 60  # the verdict for an endpoint that never answers; the pod's whole budget is 2 minutes


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials for endpoints other than the moto fixture's (botocore checks for them before connecting)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


def test_closed_port_is_unreachable_user_error_within_bound(creds: None) -> None:
    """Nothing listens (connection refused): retried for connect_deadline (a store that is still starting
    gets a chance), then StorageUnreachable naming the endpoint. Default settings, as in a trainer pod."""
    port = _free_port()  # free a moment ago: nothing listens there
    store = Storage(endpoint=f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(StorageUserError) as exc:
        store.read_text("s3://b/k")
    elapsed = time.monotonic() - start
    assert exc.value.reason == "StorageUnreachable"
    msg = str(exc.value)
    assert f"s3://b/k: cannot reach the object store at endpoint http://127.0.0.1:{port}" in msg, msg
    assert "spec.storage.endpoint" in msg
    assert store.connect_deadline <= elapsed < UNREACHABLE_BOUND_S, elapsed  # retried, then gave up in time
    attempts = int(msg.split(" attempts over ")[0].rsplit(" ", 1)[-1])
    assert attempts > 1, msg


def test_blackholed_endpoint_is_unreachable_user_error_within_bound(creds: None) -> None:
    """A host that drops SYNs (a listening socket whose accept queue is full: connects time out) is the worst
    case, the one that took 10 min 35 s before: each attempt waits for connect_timeout."""
    with socket.socket() as srv, socket.socket() as filler:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        filler.connect(("127.0.0.1", port))  # fills the queue: from now on SYNs are dropped
        store = Storage(endpoint=f"http://127.0.0.1:{port}")
        start = time.monotonic()
        with pytest.raises(StorageUserError) as exc:
            store.write_text("s3://out/run/x.txt", "x")
        elapsed = time.monotonic() - start
    assert exc.value.reason == "StorageUnreachable"
    assert "ConnectTimeoutError" in str(exc.value) and f"127.0.0.1:{port}" in str(exc.value)
    assert elapsed < UNREACHABLE_BOUND_S, elapsed
    print(f"blackholed endpoint: verdict after {elapsed:.1f} s")


def test_missing_bucket_is_a_fast_user_error(store: Storage, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for call in (
        lambda: store.read_text("s3://no-such-bucket-fast/x"),
        lambda: store.upload_file(tmp_path / "f", "s3://no-such-bucket-fast/out/f"),
        lambda: store.check_writable("s3://no-such-bucket-fast/out/"),
        lambda: store.list_prefix("s3://no-such-bucket-fast/out/"),
    ):
        start = time.monotonic()
        with pytest.raises(StorageUserError) as exc:
            call()
        assert exc.value.reason == "NoSuchBucket", exc.value
        assert "bucket 'no-such-bucket-fast' does not exist" in str(exc.value)
        assert time.monotonic() - start < 5  # not retried


def test_dot_segments_in_keys_are_refused_before_any_request(tmp_path: Path) -> None:
    store = Storage(endpoint=f"http://127.0.0.1:{_free_port()}")  # would fail (slowly) if a request were made
    for uri in ("s3://b/runs/../other/job", "s3://b/./x", "s3://b/a/..", (tmp_path / "x").as_uri() + "/../y"):
        start = time.monotonic()
        with pytest.raises(StorageUserError) as exc:
            store.write_text(uri, "x")
        assert exc.value.reason == "InvalidStorageKey" and uri in str(exc.value)
        assert time.monotonic() - start < 1
    assert not (tmp_path / "y").exists()


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this process cannot write: a read-only tmpfs for root (which ignores file modes), mode
    0555 for anyone else."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("running as root without the right to mount a read-only tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_local_output_is_a_user_error(read_only_dir: Path, tmp_path: Path) -> None:
    store = Storage()
    (tmp_path / "f").write_text("x")
    out = read_only_dir / "job"
    for call in (
        lambda: store.check_writable(out.as_uri()),
        lambda: store.check_writable(str(read_only_dir)),
        lambda: store.upload_file(tmp_path / "f", (read_only_dir / "f").as_uri()),
        lambda: store.write_text(str(read_only_dir / "manifest.json"), "{}"),
    ):
        with pytest.raises(StorageUserError) as exc:
            call()
        assert exc.value.reason == "OutputNotWritable", exc.value
        assert str(read_only_dir) in str(exc.value) and "not writable" in str(exc.value)
    assert list(read_only_dir.iterdir()) == []


def test_check_writable_leaves_nothing_behind(store: Storage, bucket: str, tmp_path: Path) -> None:
    store.check_writable(f"s3://{bucket}/runs/job")
    assert store.list_prefix(f"s3://{bucket}/") == []
    store.check_writable(str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


class StandIn:
    """A tiny HTTP server standing in for an S3 endpoint's error responses (moto cannot be told to throttle,
    fail with 5xx or drop a connection). Each request takes the next scripted answer; the last one repeats:
    ``(status, code)`` answers with an S3 error document, ``"drop"`` closes the connection without an answer,
    ``"ok"`` answers 200 with ``body``. ``requests`` counts what arrived."""

    def __init__(self, script: list[Any], body: bytes = b"hello") -> None:
        import http.server
        import threading

        self.script, self.body, self.requests = list(script), body, 0
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                self.close_connection = True  # no keep-alive: a closed server refuses the next request
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                with lock:
                    stand_in.requests += 1
                    action = stand_in.script.pop(0) if len(stand_in.script) > 1 else stand_in.script[0]
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "ok":
                    body = stand_in.body if self.command == "GET" else b""
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.send_header("ETag", '"0123"')
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                status, code = action
                doc = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>m</Message></Error>'
                data = b"" if self.command == "HEAD" else doc.encode()
                self.send_response(status)
                self.send_header("Connection", "close")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _answer

        lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in(creds: None) -> Iterator[Any]:
    servers: list[StandIn] = []

    def make(script: list[Any], body: bytes = b"hello") -> StandIn:
        servers.append(StandIn(script, body))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.mark.parametrize(
    "failure",
    [(503, "SlowDown"), (429, "TooManyRequests"), (500, "InternalError"), (502, "BadGateway"), "drop"],
    ids=["503-slowdown", "429", "500", "502", "dropped-connection"],
)
def test_transient_failures_are_retried_until_they_heal(stand_in: Any, failure: Any) -> None:
    server = stand_in([failure] * 5 + ["ok"])  # more failures than botocore's own attempts absorb
    store = Storage(endpoint=server.endpoint)
    assert store.read_text("s3://b/data.txt") == "hello"
    assert server.requests == 6


def test_persistent_throttling_gives_up_at_the_deadline_as_retryable(stand_in: Any) -> None:
    server = stand_in([(503, "SlowDown")])
    store = Storage(endpoint=server.endpoint, retry_deadline=3)
    start = time.monotonic()
    with pytest.raises(StorageError) as exc:
        store.write_text("s3://b/out/x.txt", "x")
    elapsed = time.monotonic() - start
    assert not isinstance(exc.value, StorageUserError)  # an outage may end: the Job retries (exit 1)
    msg = str(exc.value)
    assert f"s3://b/out/x.txt: the object store at endpoint {server.endpoint} kept failing with SlowDown" in msg
    assert 3 <= elapsed < 15 and server.requests >= 3, (elapsed, server.requests)  # botocore tries 3 times per call


@pytest.mark.parametrize(
    "answer,reason",
    [((403, "AccessDenied"), "StorageAccessDenied"), ((403, "InvalidAccessKeyId"), "StorageAccessDenied")],
)
def test_access_denied_fails_at_once(stand_in: Any, answer: tuple[int, str], reason: str) -> None:
    server = stand_in([answer])
    store = Storage(endpoint=server.endpoint)
    for call in (lambda: store.read_text("s3://b/data.txt"), lambda: store.write_text("s3://b/out/x", "x")):
        before = server.requests
        with pytest.raises(StorageUserError) as exc:
            call()
        assert exc.value.reason == reason and server.endpoint in str(exc.value)
        assert server.requests - before == 1  # not retried


def test_a_store_that_answered_before_is_retried_as_an_outage(stand_in: Any) -> None:
    """Connection failures after the endpoint has answered are an outage (retryable, exit 1), not a
    misconfiguration (exit 2)."""
    server = stand_in(["ok"])
    store = Storage(endpoint=server.endpoint, retry_deadline=2, connect_deadline=0.5)
    assert store.read_text("s3://b/x") == "hello"
    server.close()
    with pytest.raises(StorageError) as exc:
        store.read_text("s3://b/x")
    assert not isinstance(exc.value, StorageUserError) and "kept failing with" in str(exc.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def auth_s3() -> Iterator[tuple[str, str, dict[str, str]]]:
    """A second moto server that enforces IAM: its first 3 requests are free (bucket, user, key), every
    later one must be signed by a known key that a policy allows. Needs its own process because moto reads
    INITIAL_NO_AUTH_ACTION_COUNT at import."""
    import boto3

    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto auth server did not start") from None
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        )
        session.client("s3", endpoint_url=endpoint).create_bucket(Bucket="locked")
        iam = session.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="no-policy")
        key = iam.create_access_key(UserName="no-policy")["AccessKey"]
        yield endpoint, "locked", {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_rejected_credentials_are_named_but_not_printed(
    auth_s3: tuple[str, str, dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    endpoint, bucket, _ = auth_s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEBOGUSKEY1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-printed")
    store = Storage(endpoint=endpoint, max_attempts=1)
    with pytest.raises(StorageError) as exc:
        store.read_text(f"s3://{bucket}/data.jsonl")
    msg = str(exc.value)
    assert f"s3://{bucket}/data.jsonl" in msg
    assert "rejected the credentials (InvalidAccessKeyId)" in msg and "spec.storage.secretRef" in msg
    assert "s3cr3t-never-printed" not in msg and "AKIAEXAMPLEBOGUSKEY1" not in msg


def test_access_denied_names_uri_and_what_to_check(
    auth_s3: tuple[str, str, dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    endpoint, bucket, key = auth_s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["secret"])
    store = Storage(endpoint=endpoint, max_attempts=1)
    (tmp_path / "f").write_text("x")
    for call in (
        lambda: store.read_text(f"s3://{bucket}/data.jsonl"),
        lambda: store.upload_file(tmp_path / "f", f"s3://{bucket}/out/f"),
        lambda: store.list_prefix(f"s3://{bucket}/out/"),
    ):
        with pytest.raises(StorageError) as exc:
            call()
        msg = str(exc.value)
        assert f"s3://{bucket}/" in msg and "access denied" in msg and "bucket policy" in msg, msg
        assert key["secret"] not in msg and key["id"] not in msg


# ---- download cache ------------------------------------------------------------------------------------


def test_cached_download_file_reuses_then_refreshes_on_change(store: Storage, bucket: str, s3_server, tmp_path):
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"text": "v1"}\n')
    uri = f"s3://{bucket}/data/train.jsonl"

    first = store.cached_download(uri, tmp_path / "cache")
    assert first.name == "train.jsonl"  # keeps the extension: the format is detected from it
    assert first.read_bytes() == b'{"text": "v1"}\n'
    # Prove the second call does not download: damage the cached copy (same size); a re-download would fix it.
    first.write_bytes(b'{"text": "XX"}\n')
    assert store.cached_download(uri, tmp_path / "cache").read_bytes() == b'{"text": "XX"}\n'

    client.put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"text": "v2"}\n')  # new ETag
    again = store.cached_download(uri, tmp_path / "cache")
    assert again == first and again.read_bytes() == b'{"text": "v2"}\n'
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.parent.name]  # no partial dirs left


def test_cached_download_model_dir_redoes_interrupted_download(store: Storage, bucket: str, tmp_path: Path):
    files = {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": os.urandom(5000)}
    store.upload_dir(_tree(tmp_path / "m", files), f"s3://{bucket}/models/tiny-gpt/")
    uri = f"s3://{bucket}/models/tiny-gpt"

    path = store.cached_download(uri, tmp_path / "cache")
    assert path.name == "tiny-gpt" and path.is_dir()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files
    marker = json.loads((path.parent / COMPLETE_MARKER).read_text())
    assert marker["uri"] == uri and [o[0] for o in marker["objects"]] == sorted(files)

    # Simulate a download killed half-way: the payload is truncated and the marker was never written.
    (path.parent / COMPLETE_MARKER).unlink()
    (path / "model.safetensors").write_bytes(b"half")
    again = store.cached_download(uri, tmp_path / "cache")
    assert (again / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert (again.parent / COMPLETE_MARKER).is_file()


def test_cached_download_missing_and_local(store: Storage, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageNotFound, match=rf"s3://{bucket}/models/none: nothing at this key"):
        store.cached_download(f"s3://{bucket}/models/none", tmp_path / "cache")
    with pytest.raises(StorageNotFound, match="bucket 'no-such-bucket-c' does not exist"):
        store.cached_download("s3://no-such-bucket-c/models/none/", tmp_path / "cache")
    local = tmp_path / "train.csv"
    local.write_text("text,label\n")
    assert store.cached_download(local.as_uri(), tmp_path / "cache") == local  # nothing to copy


def test_module_level_shortcuts(s3_server, bucket: str, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("hello")
    rec = storage.upload_file(tmp_path / "f.txt", f"s3://{bucket}/f.txt", endpoint=s3_server.endpoint)
    assert rec.sha256 == _sha(b"hello")
    assert storage.list_prefix(f"s3://{bucket}/") == ["f.txt"]
    assert storage.read_text(f"s3://{bucket}/f.txt") == "hello"
    assert storage.cached_download(f"s3://{bucket}/f.txt", tmp_path / "c").read_text() == "hello"
    assert storage.delete_prefix(f"s3://{bucket}/") == 1
