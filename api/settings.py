"""Settings from the environment (prefix RAYHORDE_) with embedded defaults: SQLite and local
file storage under ./data, so a fresh checkout runs with no configuration at all."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAYHORDE_", extra="ignore")

    database_url: str = "sqlite:///./data/rayhorde.db"
    # Images: a local folder served by the API itself, or an S3 bucket with presigned URLs.
    storage: Literal["local", "s3"] = "local"
    storage_dir: str = "./data/objects"
    s3_bucket: str = "rayhorde"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_url_ttl: int = 1800
    # Where clients reach the API; image URLs under local storage are built from it.
    public_url: str = "http://127.0.0.1:8000"
    catalog_path: str = "configs/models.yaml"
    # The models this cluster serves; empty means every model of the catalog.
    served_models: list[str] = Field(default_factory=list)
    # Salt mixed into API key hashes; set a secret one in production.
    key_salt: str = "rayhorde-default-salt"
    max_body_bytes: int = 16 * 1024 * 1024
    # A generation that fails this many times ends `faulted`.
    max_attempts: int = 3
    # Priority points a waiting request gains per second, so nothing starves.
    aging_per_second: float = 1.0
    # Images one user may have waiting at once.
    max_waiting_per_user: int = 30


@lru_cache
def get_settings() -> Settings:
    return Settings()
