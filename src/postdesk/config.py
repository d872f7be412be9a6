"""One typed settings object, read from ``POSTDESK_*`` environment variables only.

Secrets may also come from a file named by ``POSTDESK_<NAME>_FILE`` (Docker/systemd credentials),
never both. Bad values fail fast with a message naming the variable; every variable is documented in
``docs/configuration.md``.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "POSTDESK_"
# Webhook URLs of Slack, Teams and the like carry their credential in the URL itself.
SECRET_FIELDS = ("secret_key", "alert_smtp_password", "alert_webhook_url")


class ConfigError(Exception):
    """The environment does not describe a usable configuration; the message says what to change."""


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, for example outlook.office365.com:993, got {value!r}")
    return value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s) URL such as https://helpdesk.example.com, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError("the URL must not carry a query string or fragment")
    return value.rstrip("/")


def _email_address(value: str) -> str:
    local, at, domain = value.strip().rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() or c in "<>,;" for c in value.strip()):
        raise ValueError(f"expected an email address such as postdesk@example.com, got {value!r}")
    return value.strip()


HostPort = Annotated[str, AfterValidator(_host_port)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
EmailAddress = Annotated[str, AfterValidator(_email_address)]


class Settings(BaseSettings):
    """Everything Postdesk reads from its environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    data_dir: Path = Field(default=Path("./postdesk-data"))
    database_url: str | None = None
    base_url: HttpUrl = "http://127.0.0.1:8025"
    secret_key: SecretStr | None = None
    microsoft_cloud: Literal["global", "usgov", "china"] = "global"
    microsoft_login_url: HttpUrl | None = None
    microsoft_imap: HostPort | None = None
    microsoft_smtp: HostPort | None = None
    microsoft_graph_url: HttpUrl | None = None
    ca_bundle: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ticket_prefix: str = "Ticket#"
    alert_webhook_url: SecretStr | None = None
    alert_smtp: HostPort | None = None
    alert_smtp_username: str | None = Field(default=None, validate_default=True)
    alert_smtp_password: SecretStr | None = Field(default=None, validate_default=True)
    alert_from: EmailAddress | None = Field(default=None, validate_default=True)
    alert_emails: Annotated[tuple[EmailAddress, ...], NoDecode] = ()
    # How long a worker's hold on a mailbox lasts without renewal (renewed every quarter of it).
    worker_lease_seconds: int = Field(default=60, ge=2, le=3600)
    # Failed sign-ins one client address (an IPv6 /64) may make within the window; 0 turns the limit off.
    login_attempts_per_address: int = Field(default=20, ge=0, le=10000)
    login_throttle_minutes: int = Field(default=15, ge=1, le=1440)

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_is_http(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        url = value.get_secret_value().strip()
        parts = urlsplit(url)
        # Unlike the other URLs a query string is allowed: Teams workflow URLs carry their signature there.
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("expected an http(s) URL such as https://hooks.example.com/postdesk")
        return SecretStr(url)

    @field_validator("alert_smtp_username")
    @classmethod
    def _username_needs_relay(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not info.data.get("alert_smtp"):
            raise ValueError("set POSTDESK_ALERT_SMTP too (the relay this account signs in to)")
        return value or None

    @field_validator("alert_smtp_password")
    @classmethod
    def _password_with_username(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if "alert_smtp_username" not in info.data:  # the username's own error says what to fix
            return value
        if (value is None) != (info.data["alert_smtp_username"] is None):
            raise ValueError("set POSTDESK_ALERT_SMTP_USERNAME and POSTDESK_ALERT_SMTP_PASSWORD together")
        return value

    @field_validator("alert_from")
    @classmethod
    def _relay_needs_sender(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("alert_smtp"):
            raise ValueError("required with POSTDESK_ALERT_SMTP: the address alert mail comes from")
        return value

    @field_validator("alert_emails", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("ticket_prefix")
    @classmethod
    def _ticket_prefix_plain(cls, value: str) -> str:
        if not 1 <= len(value) <= 20 or any(c.isspace() or c in "[]" for c in value):
            raise ValueError(
                "use 1 to 20 characters without spaces or brackets, for example Ticket# or Case-"
            )
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters; generate one with `openssl rand -base64 48`")
        return value

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir.resolve() / 'postdesk.sqlite3'}"

    @property
    def oauth_redirect_uri(self) -> str:
        """The Web redirect URI the admin registers in Entra ID; never derived from a request's Host."""
        return f"{self.base_url}/auth/microsoft365/callback"

    @property
    def uses_https(self) -> bool:
        return self.base_url.startswith("https://")

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def attachments_dir(self) -> Path:
        return self.data_dir / "attachments"


def _read_secret_files(environ: dict[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name in SECRET_FIELDS:
        variable = f"{ENV_PREFIX}{name.upper()}"
        path = environ.get(f"{variable}_FILE")
        if not path:
            continue
        if environ.get(variable):
            raise ConfigError(f"{variable} and {variable}_FILE are both set; keep only one")
        try:
            values[name] = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{variable}_FILE: cannot read {path}: {exc.strerror}") from exc
    return values


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "?"
        message = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"{ENV_PREFIX}{field.upper()}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings() -> Settings:
    """Read the settings from the process environment, or raise ConfigError saying what to fix."""
    from_files = _read_secret_files(dict(os.environ))
    try:
        return Settings(**from_files)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc
