"""A real S3-protocol server for tests: moto's server (PyPI `moto[server]`) as a child process on 127.0.0.1.

Not a mock object: relay's S3 client speaks HTTP + SigV4 to it exactly as to AWS, MinIO or R2.
`MotoS3.start()` launches it on a free port and waits (with a deadline) until it answers;
`provision()` creates the buckets and an IAM user whose key pair is then *required*: moto checks
signatures and policies from then on, so a wrong key or secret gets the 403 AWS would give.
`stop()`/`kill()` end it; `start()` again (same port) brings back an empty server, as after a crash.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REGION = "us-east-1"
START_DEADLINE = 30.0     # moto imports a lot on a cold start
ALLOW_S3 = json.dumps({"Version": "2012-10-17",
                       "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MotoS3:
    log_dir: Path
    port: int = field(default_factory=free_port)
    access_key_id: str = "not-checked-yet"       # until provision(auth=True): moto accepts any key
    secret_access_key: str = "not-checked-yet"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RELAY_"))}
        with (self.log_dir / "moto.log").open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + START_DEADLINE
        while not self.answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"moto did not answer within {START_DEADLINE:g} s: {self.log_tail()}")
            time.sleep(0.05)
        return self

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.endpoint}/moto-api/", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def provision(self, *buckets: str, auth: bool = False) -> None:
        """Create `buckets`; with `auth`, an IAM user allowed s3:*, whose key alone is accepted from now on."""
        for bucket in buckets:
            self.client("s3").create_bucket(Bucket=bucket)
        if auth:
            iam = self.client("iam")
            iam.create_user(UserName="relay")
            iam.put_user_policy(UserName="relay", PolicyName="s3", PolicyDocument=ALLOW_S3)
            key = iam.create_access_key(UserName="relay")["AccessKey"]
            self.access_key_id, self.secret_access_key = key["AccessKeyId"], key["SecretAccessKey"]
            # From here on every request must be signed by a known key and allowed by its policy.
            httpx.post(f"{self.endpoint}/moto-api/reset-auth", content=b"0", timeout=5.0).raise_for_status()

    def client(self, service: str = "s3") -> Any:
        import boto3   # moto[server] brings it; used only to set up and to look into the bucket
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the server is gone at once (connections refused), its state with it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def log_tail(self) -> str:
        path = self.log_dir / "moto.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""
