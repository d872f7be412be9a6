"""Settings come from POSTDESK_* variables only, with *_FILE for secrets, and fail fast when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from postdesk.config import ConfigError, load_settings
from postdesk.microsoft.clouds import endpoints_for


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("POSTDESK_"):
            monkeypatch.delenv(name)


def test_it_uses_the_documented_defaults() -> None:
    settings = load_settings()
    assert settings.data_dir == Path("postdesk-data")
    assert settings.base_url == "http://127.0.0.1:8025"
    assert settings.oauth_redirect_uri == "http://127.0.0.1:8025/auth/microsoft365/callback"
    assert settings.resolved_database_url.endswith("postdesk-data/postdesk.sqlite3")
    endpoints = endpoints_for(settings)
    assert (endpoints.imap, endpoints.smtp) == ("outlook.office365.com:993", "smtp.office365.com:587")
    assert endpoints.graph_url == "https://graph.microsoft.com"
    assert endpoints.login_url == "https://login.microsoftonline.com"


def test_it_reads_the_secret_key_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("k" * 40 + "\n")
    monkeypatch.setenv("POSTDESK_SECRET_KEY_FILE", str(key_file))
    settings = load_settings()
    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == "k" * 40


def test_it_refuses_a_secret_given_both_directly_and_as_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "key").write_text("k" * 40)
    monkeypatch.setenv("POSTDESK_SECRET_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("POSTDESK_SECRET_KEY", "k" * 40)
    with pytest.raises(ConfigError, match="both set"):
        load_settings()


def test_it_names_an_unreadable_secret_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POSTDESK_SECRET_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="POSTDESK_SECRET_KEY_FILE: cannot read"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("POSTDESK_BASE_URL", "helpdesk.example.com", "expected an http(s) URL"),
        ("POSTDESK_MICROSOFT_CLOUD", "mars", "'global', 'usgov' or 'china'"),
        ("POSTDESK_MICROSOFT_IMAP", "outlook.office365.com", "expected host:port"),
        ("POSTDESK_MICROSOFT_SMTP", "smtp.office365.com:99999", "expected host:port"),
        ("POSTDESK_CA_BUNDLE", "/nonexistent/ca.pem", "no such file"),
        ("POSTDESK_SECRET_KEY", "short", "at least 32 characters"),
        ("POSTDESK_TICKET_PREFIX", "[Ticket", "without spaces or brackets"),
    ],
)
def test_it_fails_fast_naming_the_bad_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert variable in str(raised.value)
    assert message in str(raised.value)


def test_it_applies_endpoint_overrides_on_top_of_the_cloud(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTDESK_MICROSOFT_CLOUD", "usgov")
    monkeypatch.setenv("POSTDESK_MICROSOFT_IMAP", "127.0.0.1:1993")
    endpoints = endpoints_for(load_settings())
    assert endpoints.imap == "127.0.0.1:1993"
    assert endpoints.smtp == "smtp.office365.us:587"
    assert endpoints.outlook_scopes[0] == "https://outlook.office365.us/IMAP.AccessAsUser.All"
