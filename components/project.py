"""A project: its root directory, validated params and where each service is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from components import credentials
from components.config import Params, load_params


# For external services, the endpoint as seen from where a process runs: a worker
# inside the team stack's network reaches the services by other names than a laptop.
S3_ENDPOINT_ENV = "ALIGNDIFF_S3_ENDPOINT_URL"
PREFECT_API_ENV = "ALIGNDIFF_PREFECT_API_URL"
LABEL_STUDIO_URL_ENV = "ALIGNDIFF_LABEL_STUDIO_URL"


@dataclass(frozen=True)
class Project:
    root: Path
    params: Params

    @classmethod
    def load(cls, root: str | Path = ".", params_file: str = "params.yaml") -> Project:
        root = Path(root).resolve()
        return cls(root=root, params=load_params(root / params_file))

    def path(self, relative: str | Path) -> Path:
        return (self.root / relative).resolve()

    @property
    def state_dir(self) -> Path:
        return self.path(self.params.services.state_dir)

    @property
    def env_file(self) -> Path:
        return self.root / ".env"

    @property
    def host(self) -> str:
        return self.params.services.host

    @property
    def s3_endpoint(self) -> str | None:
        s3 = self.params.services.s3
        return f"http://{self.host}:{s3.port}" if s3.embedded else os.environ.get(S3_ENDPOINT_ENV) or s3.endpoint_url

    @property
    def prefect_api_url(self) -> str:
        p = self.params.services.prefect
        return f"http://{self.host}:{p.port}/api" if p.embedded else os.environ.get(PREFECT_API_ENV) or str(p.api_url)

    @property
    def prefect_ui_url(self) -> str:
        return self.prefect_api_url.removesuffix("/api")

    @property
    def label_studio_url(self) -> str:
        ls = self.params.services.label_studio
        return f"http://{self.host}:{ls.port}" if ls.embedded else os.environ.get(LABEL_STUDIO_URL_ENV) or str(ls.url)

    @cached_property
    def credentials(self) -> credentials.Credentials:
        return credentials.load(self.env_file)

    def object_store(self, bucket: str | None = None):
        from components.storage import ObjectStore

        s3 = self.params.services.s3
        return ObjectStore(
            bucket=bucket or s3.bucket,
            endpoint_url=self.s3_endpoint,
            access_key=self.credentials.s3_access_key,
            secret_key=self.credentials.s3_secret_key,
            region=s3.region,
        )

    @property
    def dvc_remote_url(self) -> str:
        s3 = self.params.services.s3
        return f"s3://{s3.dvc_bucket}/{s3.dvc_prefix}"
