"""A throwaway S3-protocol server on 127.0.0.1: moto's server mode (``moto[server]``, a dev
dependency) in its own process, for the data benchmark and the tests. Its buckets live in that
process's memory: a restarted server starts empty."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import boto3

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ditlab-test", "AWS_SECRET_ACCESS_KEY": "ditlab-test-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3Server:
    """``with LocalS3Server() as server:`` a running server at ``server.endpoint``; ``server.environment``
    holds the AWS variables that point boto3 (and ditlab) at it. ``enforce_auth``: refuse every
    credential (moto accepts any by default), to see what bad credentials do."""

    def __init__(self, port: int | None = None, enforce_auth: bool = False):
        self.port = port or free_port()
        self.enforce_auth = enforce_auth
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def environment(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1", **CREDENTIALS}

    def start(self, timeout_s: float = 30.0) -> LocalS3Server:
        env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if self.enforce_auth else {}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env={**_inherited_environment(), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not self._accepts():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto's S3 server did not start on {self.endpoint}")
            time.sleep(0.1)
        return self

    def _accepts(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def client(self):
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _inherited_environment() -> dict[str, str]:
    # the server's own environment: none of the client's AWS settings (its endpoint is this server)
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
