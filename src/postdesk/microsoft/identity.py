"""Microsoft identity platform access through MSAL, the way Microsoft designed it.

One ``MicrosoftIdentity`` per app registration holds the credential, the authority and MSAL's HTTP
session and metadata cache; each mailbox (channel) has its own serialised token cache, handed to a
short-lived ``ConfidentialClientApplication`` per operation (MSAL's pattern for web apps). MSAL gets a
``requests.Session`` that ignores REQUESTS_CA_BUNDLE and trusts exactly the system CAs plus
POSTDESK_CA_BUNDLE (MSAL's own ``verify=`` is overridden by that variable).
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msal
import requests

from postdesk.config import Settings
from postdesk.db.models import MicrosoftApp, Transport
from postdesk.microsoft.clouds import Endpoints, endpoints_for

log = logging.getLogger(__name__)

OIDC_SCOPES = ("openid", "profile", "email", "offline_access")
HTTP_TIMEOUT = 30  # seconds, for connecting and for each wait for data


class NotConfigured(Exception):
    """No Microsoft 365 app registration has been entered yet."""


def trust_store(settings: Settings) -> str | bool:
    """The CA file for outbound TLS: the system store plus POSTDESK_CA_BUNDLE, merged into one file."""
    if settings.ca_bundle is None:
        return True
    # Every fetch and sign-in asks; the merge is redone only when the bundle changes.
    return _merged_trust_store(settings.data_dir, settings.ca_bundle, settings.ca_bundle.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _merged_trust_store(data_dir: Path, ca_bundle: Path, _version: int) -> str:
    system = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    parts = [
        Path(system).read_text(encoding="utf-8") if Path(system).is_file() else "",
        ca_bundle.read_text(encoding="utf-8"),
    ]
    content = "\n".join(parts)
    # Named by content: two configurations sharing a data directory never overwrite each other's file.
    merged = data_dir / f"trusted-cas-{hashlib.sha256(content.encode()).hexdigest()[:16]}.pem"
    if not merged.is_file() or merged.read_text(encoding="utf-8") != content:
        with tempfile.NamedTemporaryFile("w", dir=data_dir, delete=False, encoding="utf-8") as handle:
            handle.write(content)
        Path(handle.name).replace(merged)
    return str(merged)


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The TLS settings for IMAP and SMTP connections: the system CAs plus POSTDESK_CA_BUNDLE, made once
    per version of the CA file.

    Reading the CA store took longer than fetching a few messages, and a mailbox is fetched every few
    seconds; a context is safe to share between connections and threads.
    """
    store = trust_store(settings)
    cafile = store if isinstance(store, str) else None
    path = cafile or ssl.get_default_verify_paths().cafile
    try:
        version = os.stat(path).st_mtime_ns if path else 0
    except OSError:
        version = 0  # create_default_context says what is wrong with it
    return _cached_tls_context(cafile, version)


@functools.lru_cache(maxsize=8)
def _cached_tls_context(cafile: str | None, _version: int) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


class UnreadableAnswer(requests.exceptions.InvalidJSONError):
    """The token endpoint answered with something other than Microsoft's JSON: a proxy's or firewall's
    HTML page, a cut-off body, or JSON without either a token or an error in it."""


class IdentitySession(requests.Session):
    """MSAL's HTTP client: a timeout on every request, and token answers checked and remembered.

    ``requests`` has no session-wide timeout, and MSAL ignores its own ``timeout=`` once it is given
    an ``http_client``; without this a hanging identity platform would block a fetch for good.
    MSAL reads a token answer that is JSON but not an object (``null``, ``[]``) as a success, and one
    without a token as "no refresh token"; both are checked here, where the answer is still at hand.
    """

    def __init__(self, *, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout
        # From the last token endpoint answer: seconds it asked us to wait (Retry-After), if it did.
        self.retry_after: float | None = None

    def request(  # the same call, with a default timeout
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        headers = kwargs.get("headers") or {}
        address = url.decode() if isinstance(url, bytes) else url
        if str(method).upper() == "GET" and _DISCOVERY in address and "no-cache" not in headers.values():
            key = f"{address} {self.verify}"  # another CA bundle may not trust what this one did

            def fetch() -> requests.Response:
                return super(IdentitySession, self).request(method, url, *args, **kwargs)

            return _discovery(key, fetch)
        response = super().request(method, url, *args, **kwargs)
        if str(method).upper() == "POST" and str(url).endswith("/token"):
            self.retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            _check_token_answer(response)
        return response


_DISCOVERY = "/.well-known/openid-configuration"
DISCOVERY_SECONDS = 3600.0
_discovered: dict[str, tuple[float, requests.Response]] = {}
_discovered_lock = threading.Lock()


def _discovery(key: str, fetch: Callable[[], requests.Response]) -> requests.Response:
    """A tenant's OpenID configuration, fetched once an hour per process rather than per MSAL client.

    MSAL reads it whenever a client is built, i.e. on every fetch and every send pass; it names the
    endpoints and changes rarely. Only successful answers are kept, so an outage is not remembered; a
    request with ``Cache-Control: no-cache`` (the doctor's) always asks."""
    now = time.monotonic()
    with _discovered_lock:
        kept = _discovered.get(key)
    if kept is not None and kept[0] > now:
        return kept[1]
    response = fetch()
    if response.status_code == 200:
        response.content  # read the body now: the response is handed out again later  # noqa: B018
        with _discovered_lock:
            _discovered[key] = (now + DISCOVERY_SECONDS, response)
    return response


def _check_token_answer(response: requests.Response) -> None:
    if response.status_code >= 500:
        return  # MSAL raises for these itself ("HTTP Error: 503")
    try:
        body = response.json()
    except ValueError:
        body = None
    expected = "access_token" if response.ok else "error"
    if isinstance(body, dict) and expected in body:
        return
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip() or "no content type"
    what = f"JSON without {expected}" if isinstance(body, dict) else "something other than Microsoft's JSON"
    raise UnreadableAnswer(
        f"the token endpoint answered HTTP {response.status_code} ({content_type}) with {what}",
        response=response,
    )


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """A Retry-After header in seconds: Microsoft sends a number; HTTP also allows a date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def http_session(settings: Settings) -> IdentitySession:
    session = IdentitySession(timeout=HTTP_TIMEOUT)
    session.trust_env = False  # REQUESTS_CA_BUNDLE / proxies from the environment would override verify
    session.verify = trust_store(settings)
    return session


@dataclass(frozen=True)
class SignedInAccount:
    """Who signed in, from the checked id_token."""

    oid: str
    tenant_id: str
    username: str
    display_name: str


class MicrosoftIdentity:
    def __init__(self, settings: Settings, registration: MicrosoftApp) -> None:
        self.settings = settings
        self.registration = registration
        self.endpoints: Endpoints = endpoints_for(settings, registration.cloud)
        self.authority = f"{self.endpoints.login_url}/{registration.tenant}"
        self._http = http_session(settings)
        # Per client, on purpose: MSAL also keeps its throttling state here (a 5xx or 429 answered from
        # memory for a while), and Postdesk's own backoff decides when to ask again.
        self._http_cache: dict[Any, Any] = {}

    @property
    def scopes(self) -> list[str]:
        return self.endpoints.outlook_scopes

    def scopes_for(self, transport: Transport | None) -> list[str]:
        """The resource scopes of a mailbox's access tokens: Microsoft Graph's for a Graph channel,
        Outlook's IMAP and SMTP scopes otherwise. One token names one resource (AADSTS28000); the
        refresh token from the sign-in redeems for either, as far as the account consented to it. A
        channel not saved yet has no transport: IMAP, the column's default."""
        return self.endpoints.scopes_for((transport or Transport.IMAP).value)

    def _credential(self) -> str | dict[str, str]:
        app = self.registration
        kind = app.credential_kind
        if kind == "certificate" and app.certificate_private_key and app.certificate_thumbprint:
            return {"private_key": app.certificate_private_key, "thumbprint": app.certificate_thumbprint}
        if kind == "secret" and app.client_secret:
            return app.client_secret
        raise NotConfigured("the app registration has neither a client secret nor an active certificate")

    def client(self, cache: msal.SerializableTokenCache | None = None) -> msal.ConfidentialClientApplication:
        custom_host = self.settings.microsoft_login_url is not None
        return msal.ConfidentialClientApplication(
            self.registration.client_id,
            client_credential=self._credential(),
            authority=self.authority,
            token_cache=cache,
            http_client=self._http,
            http_cache=self._http_cache,
            # Instance discovery asks login.microsoftonline.com about the host; pointless (and
            # impossible offline) for a configured identity host.
            instance_discovery=False if custom_host else None,
        )

    def acquire_token_for_client(self, resource: str, *, force_refresh: bool = False) -> dict[str, Any]:
        """An app-only access token for ``resource`` (``https://graph.microsoft.com``) through the
        client credentials flow, as MSAL's result (``access_token`` or ``error``).

        App-only tokens come with no refresh token and belong to no mailbox, so nothing is stored: MSAL's
        own app token cache, kept in memory per app registration and credential, answers until the
        token is close to expiry. ``force_refresh`` starts that cache afresh."""
        cache = _app_token_cache(
            (self.authority, self.registration.client_id, self._credential_tag()), fresh=force_refresh
        )
        result: dict[str, Any] = self.client(cache).acquire_token_for_client([f"{resource}/.default"])
        return result

    def _credential_tag(self) -> str:
        # A new secret or certificate must not be answered from tokens the old one got.
        return hashlib.sha256(repr(self._credential()).encode()).hexdigest()

    @property
    def http_timeout(self) -> float:
        return self._http.timeout

    @property
    def retry_after(self) -> float | None:
        """Seconds the last token endpoint answer asked us to wait before asking again, if it did."""
        return self._http.retry_after

    def openid_configuration(self, *, fresh: bool = False) -> Mapping[str, Any]:
        url = f"{self.authority}/v2.0/.well-known/openid-configuration"
        response = self._http.get(url, headers={"Cache-Control": "no-cache"} if fresh else None)
        response.raise_for_status()
        document: Mapping[str, Any] = response.json()
        return document

    def expected_issuer(self, tenant_id: str) -> str:
        return f"{self.endpoints.login_url}/{tenant_id}/v2.0"


_app_caches_guard = threading.Lock()
_app_caches: dict[tuple[str, str, str], msal.SerializableTokenCache] = {}


def _app_token_cache(key: tuple[str, str, str], *, fresh: bool) -> msal.SerializableTokenCache:
    with _app_caches_guard:
        if fresh or key not in _app_caches:
            _app_caches[key] = msal.SerializableTokenCache()
        return _app_caches[key]


def load_cache(serialized: str | None) -> msal.SerializableTokenCache:
    cache = msal.SerializableTokenCache()
    if serialized:
        cache.deserialize(serialized)
    return cache
