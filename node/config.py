"""Settings for a macmesh node: CLI flag > ``MACMESH_*`` environment > TOML config file > default.

One pydantic-settings model holds every setting. The config file is ``$MACMESH_CONFIG`` or
``~/.config/macmesh/config.toml`` (``--config`` overrides both); keys are the field names below.
An invalid value, wherever it came from, fails with a message naming the setting and the value.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from node.inference.prompt_cache import DEFAULT_PROMPT_CACHE_MB

DEFAULT_GRPC_PORT = 52700
DEFAULT_CONFIG_PATH = Path("~/.config/macmesh/config.toml")


class SettingsError(ValueError):
    """A setting has a value macmesh cannot use; the message names both."""


def _default_state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME", "~/.local/state")).expanduser() / "macmesh"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MACMESH_", extra="forbid", validate_default=True)

    name: str = Field(default_factory=socket.gethostname, description="human node name")
    cluster: str = Field(default="default", min_length=1, max_length=63)
    grpc_port: int = Field(default=DEFAULT_GRPC_PORT, ge=0, le=65535)
    interface: str | None = Field(default=None, description="bind and advertise on this address")
    peers: list[str] = Field(default_factory=list, description="static peers HOST:PORT")
    mdns: bool = True
    native_mtp: bool = True
    models_dir: Path = Path("~/.cache/macmesh/models")
    state_dir: Path = Field(default_factory=_default_state_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["console", "json"] = "console"
    # Security (node.security): a secret every RPC is signed with, and optional TLS.
    cluster_secret: SecretStr | None = Field(default=None, repr=False)
    cluster_secret_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Limits on what one request may ask for (INVALID_ARGUMENT naming the limit beyond them).
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    max_prompt_chars: int = Field(default=1_000_000, ge=1)
    max_prompt_tokens: int = Field(default=131_072, ge=1)
    max_tokens_limit: int = Field(default=32_768, ge=1)
    # Requests a single-node instance decodes together in one batch (the rest wait in its
    # queue); the planner budgets KV and GatedDeltaNet state for this many sequences.
    max_batch: int = Field(default=8, ge=1, le=256)
    # Memory each single-node instance may keep for earlier requests' cache snapshots, which
    # a later prompt sharing their prefix starts from (a chat's next turn); 0 disables.
    prompt_cache_mb: int = Field(default=DEFAULT_PROMPT_CACHE_MB, ge=0)
    max_stops: int = Field(default=16, ge=0)
    max_messages: int = Field(default=4_096, ge=1)
    # Admission: a launch must leave this fraction of a node's memory free.
    launch_memory_headroom: float = Field(default=0.10, ge=0.0, lt=1.0)

    @field_validator("peers")
    @classmethod
    def _peers_are_host_port(cls, peers: list[str]) -> list[str]:
        for peer in peers:
            host, sep, port = peer.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"peer {peer!r} is not HOST:PORT")
        return peers

    @field_validator("models_dir", "state_dir")
    @classmethod
    def _expand(cls, path: Path) -> Path:
        return path.expanduser()

    @field_validator("cluster_secret_file", "tls_cert", "tls_key", "tls_ca")
    @classmethod
    def _existing_file(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        path = path.expanduser()
        if not path.is_file():
            raise ValueError(f"{str(path)!r} is not a readable file")
        return path

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = _config_path()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)


_CONFIG_OVERRIDE: Path | None = None


def _config_path() -> Path | None:
    path = _CONFIG_OVERRIDE or Path(os.environ.get("MACMESH_CONFIG", DEFAULT_CONFIG_PATH))
    path = path.expanduser()
    return path if path.is_file() else None


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Build settings; ``flags`` are CLI values (None means "not given" and falls through)."""
    global _CONFIG_OVERRIDE
    if config_file is not None and not config_file.expanduser().is_file():
        raise SettingsError(f"config file {str(config_file)!r} does not exist")
    _CONFIG_OVERRIDE = config_file
    given = {k: v for k, v in flags.items() if v is not None and v != []}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    finally:
        _CONFIG_OVERRIDE = None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        lines.append(f"invalid setting {field}={err.get('input')!r}: {err['msg']}")
    return "; ".join(lines)
