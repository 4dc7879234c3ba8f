"""One small storage layer for ``s3://`` object stores and local files (``file://`` URIs or plain paths).

Why one layer: the trainer reads a base model and data and writes checkpoints and the final model, and
every one of those may live on S3, an S3-compatible store (MinIO, Ceph) or a mounted volume. Callers
pass URIs; this module hides which is which.

S3 access uses the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) through boto3's default
credential chain, so IRSA / instance profiles work too; ``endpoint`` and ``region`` may be given
explicitly (from ``spec.storage``). Credentials are never logged and never put in an error message.

"Directory" semantics: an S3 prefix ``s3://b/models/run1`` is always read as ``s3://b/models/run1/`` by
the prefix operations, so that ``run1`` never matches ``run10/...``.

Integrity: downloads are written to a temporary file, their size checked against the object's
``ContentLength`` (and the sha256 we store in the object's metadata on upload, when present) and only then
renamed into place, so a reader never sees a half-written file. Uploads record a sha256 per file (for the
output manifest) and are checked against ``head_object``.

Faults (every S3 call goes through :meth:`Storage._call`):

* transient: throttling (503 SlowDown, 429), other 5xx, dropped connections and read timeouts are retried
  with exponential backoff and full jitter until ``retry_deadline`` (default 300 s) has passed; then a plain
  :class:`StorageError` (the trainer exits 1 and the Job retries, resuming from a checkpoint). botocore's own
  retries (``max_attempts``, adaptive mode) absorb sporadic throttling of single requests and multipart parts.
* cannot heal: 403/AccessDenied and rejected or missing credentials, NoSuchBucket, an invalid key (``.`` or
  ``..`` path segments), a local output that cannot be written, and an endpoint that has never answered
  within ``connect_deadline`` (default 20 s; with ``connect_timeout=5`` and 3 botocore attempts the verdict
  comes within about 40 s even for a host that drops packets) raise :class:`StorageUserError`, whose
  ``reason`` goes into the trainer's error report and whose exit code is 2 (never retried). An endpoint that
  answered before and then stops answering is an outage, not a misconfiguration: it is retried like a 5xx.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import unquote, urlparse

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import DeleteObjectsOutputTypeDef, ObjectIdentifierTypeDef

MiB = 1024 * 1024
SHA256_META = "sha256"  # x-amz-meta-sha256 on objects we upload
COMPLETE_MARKER = ".complete.json"
WRITE_CHECK = ".finetune-write-check-"  # a probe object written and deleted at once by check_writable

# Error codes and HTTP statuses that heal by waiting (throttling, overload, server faults).
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestThrottled",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "OperationAborted",
    }
)
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
ACCESS_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled"})
CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"})
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

T = TypeVar("T")
A = TypeVar("A")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what to check (never credentials)."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The bucket, key, prefix or local path does not exist."""


class StorageUserError(StorageError):
    """Retrying cannot fix it; the job's storage settings must change. ``reason`` (``StorageUnreachable``,
    ``StorageAccessDenied``, ``NoSuchBucket``, ``OutputNotWritable``, ``InvalidStorageKey``) goes into the
    trainer's error report, which then exits 2."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoSuchBucket(StorageUserError, StorageNotFound):
    """The bucket does not exist (also a StorageNotFound, for callers that only ask "is it there?")."""

    def __init__(self, message: str) -> None:
        super().__init__("NoSuchBucket", message)


class IntegrityError(StorageError):
    """A transferred file does not match the source (size or sha256)."""


@dataclass(frozen=True)
class FileRecord:
    """One transferred file, as it goes into a manifest.

    ``path`` is relative to the uploaded directory (``upload_dir``) or the file name (``upload_file``).
    """

    path: str
    size: int
    sha256: str
    uri: str


@dataclass(frozen=True)
class Location:
    """A parsed URI: either an S3 object/prefix or a local path."""

    uri: str
    bucket: str | None = None
    key: str = ""
    local: Path | None = None

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    @property
    def prefix(self) -> str:
        """The key as a "directory" prefix: ends with "/" unless it is the bucket root."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"


def _refuse_dot_segments(uri: str, path: str) -> None:
    if any(part in (".", "..") for part in path.split("/")):
        raise StorageUserError(
            "InvalidStorageKey",
            f"{uri}: '.' and '..' path segments are not allowed (object stores keep, resolve or refuse them "
            "differently); write the key without them",
        )


def parse_uri(uri: str) -> Location:
    """Split ``s3://bucket/key``, ``file:///abs/path`` or a plain path; other schemes are refused, and so are
    ``.``/``..`` segments in s3:// and file:// URIs (plain local paths are the CLI user's own business)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: no bucket name; expected s3://bucket/key")
        _refuse_dot_segments(uri, parsed.path)
        return Location(uri=uri, bucket=parsed.netloc, key=parsed.path.lstrip("/"))
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: file:// URIs must be local (file:///absolute/path)")
        _refuse_dot_segments(uri, unquote(parsed.path))
        return Location(uri=uri, local=Path(unquote(parsed.path)))
    # A one-letter "scheme" is a Windows drive, anything with no scheme is a local path.
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StorageError(f"{uri}: unsupported URI scheme {parsed.scheme!r}; use s3:// or file://")
    return Location(uri=uri, local=Path(uri))


def join_uri(base: str, *parts: str) -> str:
    """``join_uri("s3://b/run/", "model", "config.json")`` -> ``s3://b/run/model/config.json``."""
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _unwrap(exc: BaseException) -> BaseException:
    """boto3's transfer manager wraps the real error (S3UploadFailedError, RetriesExceededError)."""
    if isinstance(exc, S3UploadFailedError | RetriesExceededError):
        cause = exc.__cause__ or exc.__context__ or getattr(exc, "last_exception", None)
        if isinstance(cause, BaseException):
            return cause
    return exc


def classify(exc: BaseException) -> Literal["transient", "connect", "fatal"]:
    """How a failed S3 call may heal: ``transient`` (throttling, 5xx, dropped connection: wait and retry),
    ``connect`` (no connection at all: retry briefly, and only where the endpoint has answered before) or
    ``fatal`` (a 4xx answer, missing credentials, anything else: retrying returns the same)."""
    exc = _unwrap(exc)
    if isinstance(exc, ClientError):
        status = _status(exc)
        if _code(exc) in TRANSIENT_CODES or (status is not None and status in TRANSIENT_STATUSES):
            return "transient"
        return "fatal"
    if isinstance(exc, BotoConnectionError):  # refused, DNS failure, connect timeout, proxy
        return "connect"
    if isinstance(exc, HTTPClientError | IncompleteReadError | RetriesExceededError):  # dropped, read timeout
        return "transient"
    if isinstance(exc, S3UploadFailedError):  # no cause to look at: the message is all there is
        text = str(exc)
        return "transient" if any(code in text for code in TRANSIENT_CODES) else "fatal"
    return "fatal"


def _not_writable(exc: OSError, uri: str, path: Path) -> StorageError:
    if exc.errno in NOT_WRITABLE:
        return StorageUserError(
            "OutputNotWritable",
            f"write {uri}: {path} is not writable ({os.strerror(exc.errno or 0)}); choose an output location "
            "this pod may write to",
        )
    return StorageError(f"write {uri}: {type(exc).__name__}: {exc}")


def _walk_files(root: Path) -> Iterator[Path]:
    """Files under ``root`` in a stable order (sorted), skipping our temporary files."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and ".partial-" not in path.name:
            yield path


class Storage:
    """S3 and local file operations behind one API. One instance holds one boto3 client (thread-safe)."""

    def __init__(
        self,
        endpoint: str | None = None,
        region: str | None = None,
        *,
        max_attempts: int = 2,
        retry_mode: Literal["standard", "adaptive"] = "adaptive",
        retry_deadline: float = 300.0,
        connect_deadline: float = 20.0,
        connect_timeout: float = 5.0,
        multipart_threshold: int = 8 * MiB,
        multipart_chunksize: int = 8 * MiB,
        max_concurrency: int = 10,
        download_chunksize: int = 64 * MiB,
        file_concurrency: int = 8,
    ) -> None:
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        # "adaptive" adds client-side rate limiting on top of "standard" retries (throttling, 5xx, dropped
        # connections), which is what a store that throttles a checkpoint upload burst needs. These few
        # in-request retries absorb a sporadic 503 on one multipart part; _call retries whole operations
        # with backoff up to a deadline.
        self.retry_deadline = retry_deadline
        self.connect_deadline = connect_deadline
        self.backoff_base, self.backoff_cap = 0.5, 20.0
        self.reached = False  # did the endpoint ever answer (any HTTP response, errors included)?
        self._config = Config(
            region_name=self.region,
            retries={"max_attempts": max_attempts, "mode": retry_mode},
            connect_timeout=connect_timeout,
            read_timeout=120,
            # a large file's parts and the other files in flight each hold a connection
            max_pool_connections=max(10, max_concurrency + file_concurrency),
            # S3-compatible stores (MinIO, Ceph, moto) are usually addressed by path, not virtual host.
            s3={"addressing_style": "path"} if self.endpoint else {},
        )
        self.file_concurrency = file_concurrency
        # Uploads: boto3's own part size and threads (s3transfer raises the part size itself for files beyond
        # 10,000 parts). Downloads: fewer, larger ranged GETs, which were 2-3x faster on the S3 bench
        # (docs/benchmarks.md, bench-storage) and cost a store nothing more.
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )
        self.download_transfer = TransferConfig(
            multipart_threshold=download_chunksize,
            multipart_chunksize=download_chunksize,
            max_concurrency=max_concurrency,
        )
        self._client: S3Client | None = None

    @property
    def client(self) -> S3Client:
        """Created on first S3 use, so purely local work needs no AWS configuration at all."""
        if self._client is None:
            client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, region_name=self.region, config=self._config
            )
            client.meta.events.register("after-call.s3", self._answered)  # any HTTP response, errors too
            self._client = client
        return self._client

    def _answered(self, **_kwargs: Any) -> None:
        self.reached = True

    def _call(self, uri: str, action: str, fn: Callable[[], T]) -> T:
        """``fn()`` (one S3 operation), retried while the failure may heal (see :func:`classify`): with
        exponential backoff and full jitter up to ``retry_deadline``; connection failures of an endpoint that
        never answered only up to ``connect_deadline``, then StorageUnreachable. A fatal error is re-raised
        as it is, for the caller to map (a 404 is often an answer, not an error)."""
        start, attempt = time.monotonic(), 0
        while True:
            try:
                return fn()
            except (ClientError, BotoCoreError, S3UploadFailedError, RetriesExceededError) as exc:
                kind = classify(exc)
                if kind == "fatal":
                    raise
                unreachable = kind == "connect" and not self.reached
                limit = self.connect_deadline if unreachable else self.retry_deadline
                elapsed = time.monotonic() - start
                attempt += 1
                if elapsed >= limit:
                    raise self._gave_up(_unwrap(exc), uri, action, attempt, elapsed, unreachable) from None
                delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))
                time.sleep(min(delay, limit - elapsed))  # a last attempt at the deadline

    def _gave_up(
        self, exc: BaseException, uri: str, action: str, attempts: int, elapsed: float, unreachable: bool
    ) -> StorageError:
        where = f"endpoint {self.endpoint}" if self.endpoint else f"the S3 endpoint of region {self.region}"
        tried = f"{attempts} attempts over {elapsed:.0f} s"
        if unreachable:
            return StorageUserError(
                "StorageUnreachable",
                f"{action} {uri}: cannot reach the object store at {where} ({type(exc).__name__}; {tried}); "
                "check spec.storage.endpoint and the network path from the pod",
            )
        what = f"{_code(exc)} (HTTP {_status(exc)})" if isinstance(exc, ClientError) else type(exc).__name__
        return StorageError(
            f"{action} {uri}: the object store at {where} kept failing with {what}; gave up after {tried}"
        )

    # ---- errors -------------------------------------------------------------------------------------

    def _error(self, exc: Exception, uri: str, action: str) -> StorageError:
        """A StorageError naming the URI and what to check. Only the error code goes in, never the
        response body or request (a signature mismatch response can echo the access key id)."""
        where = f" at endpoint {self.endpoint}" if self.endpoint else ""
        if isinstance(exc, NoCredentialsError):
            return StorageUserError(
                "StorageAccessDenied",
                f"{action} {uri}: no S3 credentials found; set spec.storage.secretRef (AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY) or give the pod an IAM role",
            )
        if isinstance(exc, BotoConnectionError | ConnectionClosedError):
            return StorageError(
                f"{action} {uri}: cannot reach the object store{where}; check spec.storage.endpoint and "
                "the network path from the pod"
            )
        if not isinstance(exc, ClientError):
            return StorageError(f"{action} {uri}: {type(exc).__name__}{where}")
        code = _code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return self._no_bucket(uri, action)
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageNotFound(f"{action} {uri}: no such object; check the key/path")
        if code in CREDENTIAL_CODES:
            return StorageUserError(
                "StorageAccessDenied",
                f"{action} {uri}: the object store rejected the credentials ({code}){where}; check the "
                "credentials Secret (spec.storage.secretRef) and that it belongs to this endpoint",
            )
        if code in ACCESS_CODES or status == 403:
            return StorageUserError(
                "StorageAccessDenied",
                f"{action} {uri}: access denied ({code or 'HTTP 403'}){where}; check the credentials Secret "
                "(spec.storage.secretRef) and that they may use this bucket and prefix (bucket policy / IAM)",
            )
        return StorageError(f"{action} {uri}: object store error {code or 'unknown'} (HTTP {status}){where}")

    def _bucket_exists(self, loc: Location, action: str) -> bool:
        assert loc.bucket is not None
        try:
            bucket = loc.bucket
            self._call(loc.uri, action, lambda: self.client.head_bucket(Bucket=bucket))
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise self._error(exc, loc.uri, action) from None
        except BotoCoreError as exc:
            raise self._error(exc, loc.uri, action) from None
        return True

    def _no_bucket(self, uri: str, action: str) -> NoSuchBucket:
        where = f" at endpoint {self.endpoint}" if self.endpoint else ""
        return NoSuchBucket(
            f"{action} {uri}: bucket {parse_uri(uri).bucket!r} does not exist{where}; check the bucket name, "
            "spec.storage.endpoint and region"
        )

    def _missing(self, loc: Location, action: str) -> StorageNotFound:
        """head_object answers a bare 404 both for a missing key and a missing bucket: ask which."""
        if not self._bucket_exists(loc, action):
            return self._no_bucket(loc.uri, action)
        return StorageNotFound(f"{action} {loc.uri}: no such object in bucket {loc.bucket!r}; check the key")

    def _head(self, loc: Location, action: str) -> dict[str, Any] | None:
        """The object's head, or None when the key does not exist (a missing bucket is an error)."""
        assert loc.bucket is not None
        try:
            bucket = loc.bucket
            return dict(self._call(loc.uri, action, lambda: self.client.head_object(Bucket=bucket, Key=loc.key)))
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchKey", "NotFound"):
                raise self._error(exc, loc.uri, action) from None
        except BotoCoreError as exc:
            raise self._error(exc, loc.uri, action) from None
        if not self._bucket_exists(loc, action):
            raise self._no_bucket(loc.uri, action)
        return None

    def _objects(self, loc: Location, action: str) -> list[tuple[str, int, str]]:
        """(relative key, size, etag) of every object under the prefix, sorted by key."""
        assert loc.bucket is not None
        prefix, bucket = loc.prefix, loc.bucket

        def listing() -> list[tuple[str, int, str]]:  # retried as a whole: pages of a listing belong together
            out: list[tuple[str, int, str]] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) :]
                    if rel and not rel.endswith("/"):  # "folder" placeholder objects carry no data
                        out.append((rel, int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
            return out

        try:
            return sorted(self._call(loc.uri, action, listing))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, loc.uri, action) from None

    # ---- single files -------------------------------------------------------------------------------

    def download_file(self, uri: str, dest: str | Path) -> Path:
        """Copy one object/file to ``dest`` (a file path), atomically and size-checked."""
        loc, dest = parse_uri(uri), Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            if loc.local is not None:
                if not loc.local.is_file():
                    raise StorageNotFound(f"download {uri}: no such file {loc.local}; check the path")
                shutil.copyfile(loc.local, tmp)
                expected_size, expected_sha = loc.local.stat().st_size, None
            else:
                head = self._head(loc, "download")
                if head is None:
                    raise StorageNotFound(f"download {uri}: no such object in bucket {loc.bucket!r}; check the key")
                expected_size = int(head["ContentLength"])
                expected_sha = head.get("Metadata", {}).get(SHA256_META)
                bucket = loc.bucket
                assert bucket is not None
                try:
                    self._call(
                        uri,
                        "download",
                        lambda: self.client.download_file(bucket, loc.key, str(tmp), Config=self.download_transfer),
                    )
                except (ClientError, BotoCoreError, RetriesExceededError) as exc:
                    raise self._error(_unwrap(exc), uri, "download") from None  # type: ignore[arg-type]
            size = tmp.stat().st_size
            if size != expected_size:
                raise IntegrityError(f"download {uri}: got {size} bytes, expected {expected_size}; retry")
            if expected_sha and _sha256_file(tmp) != expected_sha:
                raise IntegrityError(f"download {uri}: sha256 mismatch with the uploaded file; retry")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def upload_file(self, path: str | Path, uri: str) -> FileRecord:
        """Copy one local file to ``uri``; returns its size and sha256 for the manifest."""
        path = Path(path)
        if not path.is_file():
            raise StorageNotFound(f"upload {uri}: local file {path} does not exist")
        size, sha = path.stat().st_size, _sha256_file(path)
        loc = parse_uri(uri)
        if loc.local is not None:
            tmp = loc.local.with_name(f"{loc.local.name}.partial-{uuid.uuid4().hex[:8]}")
            try:
                loc.local.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp)
                os.replace(tmp, loc.local)
            except OSError as exc:
                raise _not_writable(exc, uri, loc.local) from None
            finally:
                with contextlib.suppress(OSError):  # a read-only file system refuses even this
                    tmp.unlink(missing_ok=True)
            return FileRecord(path=path.name, size=size, sha256=sha, uri=uri)
        bucket = loc.bucket
        assert bucket is not None
        try:
            self._call(
                uri,
                "upload",
                lambda: self.client.upload_file(
                    str(path), bucket, loc.key, ExtraArgs={"Metadata": {SHA256_META: sha}}, Config=self.transfer
                ),
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, uri, "upload") from None
        except S3UploadFailedError as exc:  # boto3 wraps the ClientError; its context has the code
            cause = exc.__cause__ or exc.__context__
            err = cause if isinstance(cause, ClientError | BotoCoreError) else exc
            raise self._error(err, uri, "upload") from None
        head = self._head(loc, "upload")
        if head is None or int(head["ContentLength"]) != size:
            got = None if head is None else head["ContentLength"]
            raise IntegrityError(f"upload {uri}: store reports {got} bytes, uploaded {size}; retry")
        return FileRecord(path=path.name, size=size, sha256=sha, uri=uri)

    def exists(self, uri: str) -> bool:
        """True when ``uri`` is an existing file/object, or a "directory" with at least one file in it."""
        loc = parse_uri(uri)
        if loc.local is not None:
            return loc.local.is_file() or (loc.local.is_dir() and any(_walk_files(loc.local)))
        if loc.key and not loc.key.endswith("/") and self._head(loc, "check") is not None:
            return True
        bucket = loc.bucket
        assert bucket is not None
        try:
            resp = self._call(
                uri, "check", lambda: self.client.list_objects_v2(Bucket=bucket, Prefix=loc.prefix, MaxKeys=1)
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, uri, "check") from None
        return int(resp.get("KeyCount", 0)) > 0

    def read_text(self, uri: str, encoding: str = "utf-8") -> str:
        loc = parse_uri(uri)
        if loc.local is not None:
            if not loc.local.is_file():
                raise StorageNotFound(f"read {uri}: no such file {loc.local}; check the path")
            return loc.local.read_text(encoding=encoding)
        bucket = loc.bucket
        assert bucket is not None
        try:  # the body is read inside the retried call: a connection dropped mid-body is retried too
            body = self._call(uri, "read", lambda: self.client.get_object(Bucket=bucket, Key=loc.key)["Body"].read())
        except ClientError as exc:
            missing = _code(exc) in ("404", "NoSuchKey")
            raise (self._missing(loc, "read") if missing else self._error(exc, uri, "read")) from None
        except BotoCoreError as exc:
            raise self._error(exc, uri, "read") from None
        return body.decode(encoding)

    def write_text(self, uri: str, text: str, encoding: str = "utf-8") -> FileRecord:
        data = text.encode(encoding)
        loc = parse_uri(uri)
        sha = hashlib.sha256(data).hexdigest()
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if loc.local is not None:
            tmp = loc.local.with_name(f"{loc.local.name}.partial-{uuid.uuid4().hex[:8]}")
            try:
                loc.local.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(data)
                os.replace(tmp, loc.local)  # readers (e.g. a manifest poller) never see half a file
            except OSError as exc:
                raise _not_writable(exc, uri, loc.local) from None
            finally:
                with contextlib.suppress(OSError):  # a read-only file system refuses even this
                    tmp.unlink(missing_ok=True)
        else:
            bucket = loc.bucket
            assert bucket is not None
            try:
                self._call(
                    uri,
                    "write",
                    lambda: self.client.put_object(Bucket=bucket, Key=loc.key, Body=data, Metadata={SHA256_META: sha}),
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, uri, "write") from None
        return FileRecord(path=name, size=len(data), sha256=sha, uri=uri)

    def _delete_batch(self, bucket: str, batch: list[ObjectIdentifierTypeDef]) -> DeleteObjectsOutputTypeDef:
        return self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})

    def delete_file(self, uri: str) -> None:
        """Delete one object/file (``delete_prefix`` treats its argument as a directory); missing is fine."""
        loc = parse_uri(uri)
        if loc.local is not None:
            try:
                loc.local.unlink(missing_ok=True)
            except OSError as exc:
                raise _not_writable(exc, uri, loc.local) from None
            return
        bucket = loc.bucket
        assert bucket is not None
        try:
            self._call(uri, "delete", lambda: self.client.delete_object(Bucket=bucket, Key=loc.key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, uri, "delete") from None

    def check_writable(self, uri: str) -> None:
        """Write and delete a small probe object under ``uri`` (a "directory"): an output that cannot be
        written (read-only path, 403, no such bucket, unreachable store) fails before any work is done,
        not at the first checkpoint. Rotation deletes checkpoints, so the delete is part of the check."""
        loc = parse_uri(uri)
        probe = join_uri(uri, f"{WRITE_CHECK}{uuid.uuid4().hex[:12]}")
        if loc.local is not None:
            try:
                loc.local.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _not_writable(exc, uri, loc.local) from None
        self.write_text(probe, "probe\n")
        self.delete_file(probe)

    # ---- prefixes ("directories") ------------------------------------------------------------------

    def list_prefix(self, uri: str) -> list[str]:
        """Relative keys (posix paths) of all files under ``uri``, sorted. A missing prefix lists as []."""
        loc = parse_uri(uri)
        if loc.local is not None:
            if not loc.local.is_dir():
                return []
            return [p.relative_to(loc.local).as_posix() for p in _walk_files(loc.local)]
        return [rel for rel, _, _ in self._objects(loc, "list")]

    def download_prefix(self, uri: str, dest_dir: str | Path) -> list[Path]:
        """Download every file under ``uri`` into ``dest_dir`` keeping relative paths; returns local paths."""
        dest_dir = Path(dest_dir)
        rels = self.list_prefix(uri)
        if not rels:
            raise StorageNotFound(f"download {uri}: no files under this prefix; check the path")
        targets = []
        for rel in rels:
            target = (dest_dir / rel).resolve()
            if not target.is_relative_to(dest_dir.resolve()):  # a key like "../x" must not escape dest_dir
                raise StorageError(f"download {uri}: refusing key {rel!r} that points outside {dest_dir}")
            targets.append((join_uri(uri, rel), target))
        return self._each(lambda item: self.download_file(*item), targets)

    def upload_dir(self, local_dir: str | Path, uri: str) -> list[FileRecord]:
        """Upload every file under ``local_dir`` to ``uri``; records carry paths relative to ``local_dir``."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageNotFound(f"upload {uri}: local directory {local_dir} does not exist")

        def one(path: Path) -> FileRecord:
            rel = path.relative_to(local_dir).as_posix()
            rec = self.upload_file(path, join_uri(uri, rel))
            return FileRecord(path=rel, size=rec.size, sha256=rec.sha256, uri=rec.uri)

        return self._each(one, list(_walk_files(local_dir)))

    def _each(self, fn: Callable[[A], T], items: list[A]) -> list[T]:
        """``[fn(x) for x in items]`` with up to ``file_concurrency`` files in flight (a model or checkpoint is
        one large file and many small ones: the small ones would otherwise wait one round trip each). Every
        call has finished when this returns; the first failure, in item order, is raised."""
        if self.file_concurrency <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(self.file_concurrency, len(items)), thread_name_prefix="storage") as pool:
            futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]

    def delete_prefix(self, uri: str) -> int:
        """Delete every file under ``uri``; returns how many were deleted."""
        loc = parse_uri(uri)
        if loc.local is not None:
            if not loc.local.exists():
                return 0
            count = len(list(_walk_files(loc.local))) if loc.local.is_dir() else 1
            try:
                if loc.local.is_dir():
                    shutil.rmtree(loc.local)
                else:
                    loc.local.unlink()
            except OSError as exc:
                raise _not_writable(exc, uri, loc.local) from None
            return count
        assert loc.bucket is not None
        keys = [loc.prefix + rel for rel, _, _ in self._objects(loc, "delete")]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch: list[ObjectIdentifierTypeDef] = [{"Key": k} for k in keys[start : start + 1000]]
            try:
                resp = self._call(uri, "delete", functools.partial(self._delete_batch, loc.bucket, batch))
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, uri, "delete") from None
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(
                    f"delete {uri}: {len(resp['Errors'])} objects not deleted, e.g. {first.get('Key')} "
                    f"({first.get('Code')}); check delete permissions"
                )
        return len(keys)

    # ---- download cache -----------------------------------------------------------------------------

    def _fingerprint(self, loc: Location) -> tuple[str, list[list[Any]]]:
        """("file" | "dir", [[relative key, size, etag], ...]) describing what is at ``loc`` now."""
        if loc.key and not loc.key.endswith("/"):
            head = self._head(loc, "download")
            if head is not None:
                return "file", [["", int(head["ContentLength"]), str(head.get("ETag", "")).strip('"')]]
        objects = self._objects(loc, "download")
        if not objects:
            if not self._bucket_exists(loc, "download"):
                raise self._no_bucket(loc.uri, "download")
            raise StorageNotFound(f"download {loc.uri}: nothing at this key or under this prefix; check the path")
        return "dir", [list(o) for o in objects]

    def cached_download(self, uri: str, cache_dir: str | Path) -> Path:
        """Download a file or a "directory" (e.g. a model) once; later calls reuse it while it is unchanged.

        The entry lives in ``cache_dir/<sha256(uri)[:24]>/`` and holds the payload (named after the last
        path component, so a data file keeps its extension) and a completion marker listing every object's
        size and ETag. A download goes to a temporary directory that is renamed into place only after the
        marker is written, so an interrupted download is never used: the next call starts over. A cached
        entry whose objects changed (different ETag or size) is downloaded again. Local paths are returned
        as they are: there is nothing to cache.
        """
        loc = parse_uri(uri)
        if loc.local is not None:
            if not loc.local.exists():
                raise StorageNotFound(f"download {uri}: no such file or directory {loc.local}; check the path")
            return loc.local
        kind, objects = self._fingerprint(loc)
        cache_dir = Path(cache_dir)
        entry = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:24]
        name = loc.key.rstrip("/").rsplit("/", 1)[-1] or str(loc.bucket)
        marker = entry / COMPLETE_MARKER
        if marker.is_file():
            try:
                if json.loads(marker.read_text())["objects"] == objects:
                    return entry / name
            except (ValueError, KeyError):
                pass  # a damaged marker means a damaged entry: download again
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name}.partial-", dir=cache_dir))
        try:
            if kind == "file":
                self.download_file(uri, tmp / name)
            else:
                self.download_prefix(uri, tmp / name)
            record = {"uri": uri, "kind": kind, "objects": objects}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(record, indent=1))
            if entry.exists():
                shutil.rmtree(entry)  # stale or interrupted: no marker, or objects changed
            try:
                os.rename(tmp, entry)
            except OSError:
                # Another process finished the same download first; use theirs when it is complete.
                if not (entry / COMPLETE_MARKER).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return entry / name


def storage_for(endpoint: str | None = None, region: str | None = None) -> Storage:
    """A Storage for ``spec.storage`` (endpoint/region may be None: the environment decides)."""
    return Storage(endpoint=endpoint, region=region)


# Module-level shortcuts for one-off calls; loops (checkpoint uploads) should keep one Storage instance.


def download_file(uri: str, dest: str | Path, *, endpoint: str | None = None, region: str | None = None) -> Path:
    return Storage(endpoint, region).download_file(uri, dest)


def download_prefix(
    uri: str, dest_dir: str | Path, *, endpoint: str | None = None, region: str | None = None
) -> list[Path]:
    return Storage(endpoint, region).download_prefix(uri, dest_dir)


def upload_file(path: str | Path, uri: str, *, endpoint: str | None = None, region: str | None = None) -> FileRecord:
    return Storage(endpoint, region).upload_file(path, uri)


def upload_dir(
    local_dir: str | Path, uri: str, *, endpoint: str | None = None, region: str | None = None
) -> list[FileRecord]:
    return Storage(endpoint, region).upload_dir(local_dir, uri)


def list_prefix(uri: str, *, endpoint: str | None = None, region: str | None = None) -> list[str]:
    return Storage(endpoint, region).list_prefix(uri)


def exists(uri: str, *, endpoint: str | None = None, region: str | None = None) -> bool:
    return Storage(endpoint, region).exists(uri)


def read_text(uri: str, *, endpoint: str | None = None, region: str | None = None) -> str:
    return Storage(endpoint, region).read_text(uri)


def write_text(uri: str, text: str, *, endpoint: str | None = None, region: str | None = None) -> FileRecord:
    return Storage(endpoint, region).write_text(uri, text)


def delete_prefix(uri: str, *, endpoint: str | None = None, region: str | None = None) -> int:
    return Storage(endpoint, region).delete_prefix(uri)


def cached_download(uri: str, cache_dir: str | Path, *, endpoint: str | None = None, region: str | None = None) -> Path:
    return Storage(endpoint, region).cached_download(uri, cache_dir)
