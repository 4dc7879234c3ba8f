"""A local S3 endpoint for the benchmarks: moto in server mode on loopback, as the tests use it, but in its own
process (so that the S3 server and the client under test do not share one interpreter lock)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,  # never the developer's ~/.aws
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1; sets the AWS_* environment of this process to use it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MotoServer:
        for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(key, None)
        os.environ.update(CREDENTIALS)
        os.environ["AWS_ENDPOINT_URL"] = self.endpoint
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-moto-{self.port}.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto server exited: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        raise RuntimeError("moto server did not start in 60 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
