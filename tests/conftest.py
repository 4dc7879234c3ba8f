"""Repository-wide test fixtures.

* kubectl is the project's own (v1.20.2, scripts/k8s-build.sh; see tests/kubectl.py): its directory goes first
  on PATH at import time, so tests and every subprocess they start run it, not the host's kubectl.
* Model hubs are switched off for the whole session (set at import time, before transformers or datasets
  are imported by any test module): a test that tries to download a model fails instead of hanging.
* ``s3_server``: a real S3 endpoint for the session, moto in server mode on 127.0.0.1 (the S3 HTTP
  protocol, not an in-process mock), with the standard AWS environment pointed at it. Code under test
  uses boto3 exactly as in production.

Use it from any test file:

    def test_upload(s3_server):
        bucket = s3_server.make_bucket()          # a fresh, uniquely named bucket
        ...  # boto3 / finetune_trainer.storage now talk to s3_server.endpoint
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.kubectl import use_project_kubectl

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

use_project_kubectl()

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
# Tokenizers would otherwise warn (and may deadlock) when pytest or datasets fork after first use.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEST_REGION = "us-east-1"
TEST_ACCESS_KEY = "testing"
TEST_SECRET_KEY = "testing"


@dataclass
class S3Server:
    """A running moto S3 server. ``endpoint`` is its URL, e.g. http://127.0.0.1:41235."""

    endpoint: str
    region: str = TEST_REGION

    def client(self) -> S3Client:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name when none is given, so tests never share state); returns its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free port
    server.start()
    host, port = server.get_host_and_port()
    mp = pytest.MonkeyPatch()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": TEST_REGION,
        "AWS_REGION": TEST_REGION,
        # Never read the developer's ~/.aws: a profile or real credentials must not leak into tests.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    for key, value in env.items():
        mp.setenv(key, value)
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(key, raising=False)
    try:
        yield S3Server(endpoint=env["AWS_ENDPOINT_URL"])
    finally:
        mp.undo()
        server.stop()
