"""An S3-compatible store for the tests: moto's server (PyPI `moto[server]`, in the dev extra) on 127.0.0.1, a fresh
bucket per test; boto3 finds it through AWS_ENDPOINT_URL as it would find MinIO or Ceph."""

from __future__ import annotations

import secrets
import socket


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip

    def new_bucket(self, prefix: str = "deltaserve") -> str:
        """The s3:// URL of a prefix in a new, empty bucket."""
        bucket = "t-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=bucket)
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        self._server.stop()
