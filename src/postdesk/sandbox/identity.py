"""The sandbox identity platform: directory state and an ASGI app speaking Microsoft's v2.0 protocol.

It imitates the parts of the Microsoft identity platform that Postdesk meets when it connects a
Microsoft 365 mailbox: discovery documents and keys, the authorize endpoint with its sign-in and
consent pages, the token endpoint (authorization code, refresh token, client credentials) with client
secrets and certificate assertions, admin consent, and Microsoft's error shapes and AADSTS numbers.
Behaviour follows Microsoft's public documentation, never a particular client, so that code tested
here behaves the same against login.microsoftonline.com. Real MSAL for Python works against it.

Everything lives in memory in one ``SandboxDirectory``; tests change it directly, other processes
(``postdesk demo``) through the small JSON control API under ``/_sandbox/``.

Shared mailboxes: ``directory.add_shared_mailbox(address, display_name)`` creates one (it has no user
who can sign in, as in Exchange Online), and ``directory.grant_mailbox_rights(shared, delegate,
full_access=True, send_as=True)`` stands for ``Add-MailboxPermission -AccessRights FullAccess`` and
``Add-RecipientPermission -AccessRights SendAs``; ``revoke_mailbox_rights`` takes them back. This one
table of rights is what every sandbox server consults: the Dovecot IMAP server (through ``mailboxes`` in
the introspection answer: the addresses the token's user may open, its own and those it has FullAccess
on), the SMTP submission server (SendAs) and the Graph mail API (FullAccess, SendAs, SendOnBehalf).

Apps, for app-only IMAP and SMTP: ``directory.grant_mailbox_rights(mailbox, app.client_id,
send_as=False)`` stands for ``New-ServicePrincipal`` plus ``Add-MailboxPermission -User <service
principal> -AccessRights FullAccess``. Rights are keyed by the app's client id (the service principal's
object id, the ``oid`` of its tokens, counts as the same app). An app-only Outlook token with the role
IMAP.AccessAsApp lists in its introspection answer the mailboxes the app has FullAccess on
(``mailboxes_openable_by_app``), and the submission server lets one with SMTP.SendAsApp send as them.

Faults for the next calls queue up per endpoint, one call each: ``fail_next`` (Microsoft's error body,
optionally with ``Retry-After``), and for the token endpoint ``answer_next`` (a raw body of any status
and content type, as a proxy or broken front end sends) and ``delay_next`` (a hang before the normal
answer). The control API has them as ``fail-next``, ``answer-next`` and ``delay-next``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import string
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import unquote, urlencode, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from postdesk.sandbox.mailpage import MailPage

SignInAudience = Literal["AzureADMyOrg", "AzureADMultipleOrgs", "AzureADandPersonalMicrosoftAccount"]
Endpoint = Literal["authorize", "token"]
AuthorityKind = Literal["tenant", "common", "organizations", "consumers"]
ResponseMode = Literal["query", "fragment", "form_post"]

# Fixed identifiers so that demo output and test expectations are stable from run to run.
CONTOSO_TENANT_ID = "5c2e8f1a-7b3d-4e6f-9a1c-2d4b6e8f0a13"
FABRIKAM_TENANT_ID = "a7d3c9e1-4f2b-4a8d-b6e5-3c1f9d7b2e48"
ADELE_OID = "1f6a2c8e-3b5d-4f7a-9c1e-2a4b6c8d0e21"
MEGAN_OID = "2e7b3d9f-4c6e-4a8b-8d2f-3b5c7d9e1f32"
SUPPORT_OID = "3d8c4e0a-5d7f-4b9c-9e3a-4c6d8e0f2a43"
ALEX_OID = "4c9d5f1b-6e8a-4cad-8f4b-5d7e9f1a3b54"
# Microsoft's fixed tenant for personal Microsoft accounts; it appears in /consumers metadata.
CONSUMERS_TENANT_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"

# Exchange's names for the mailbox rights a delegate can hold (graph.MailboxRight has the same values).
FULL_ACCESS = "FullAccess"
SEND_AS = "SendAs"

CODE_LIFETIME = timedelta(minutes=10)
REFRESH_TOKEN_MAX_INACTIVE = timedelta(days=90)
PENDING_SIGN_IN_LIFETIME = timedelta(minutes=30)
ACCESS_TOKEN_LIFETIME = timedelta(seconds=3599)
ID_TOKEN_LIFETIME = timedelta(hours=1)
SECRET_LIFETIME = timedelta(days=180)
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Microsoft tolerates a few minutes of clock skew on client assertions.
ASSERTION_LEEWAY = timedelta(minutes=5)
SESSION_COOKIE = "sandbox_session"
NO_STORE = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}
TEMPLATES_DIR = Path(__file__).parent / "templates"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _new_guid() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------------------------------------
# Resources and scopes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Resource:
    """An API that tokens can be issued for, with the permissions the sandbox knows about."""

    identifier: str
    display_name: str
    aliases: tuple[str, ...]
    delegated: Mapping[str, str]
    application: tuple[str, ...]
    # Microsoft returns Graph permissions unqualified in the token response's `scope` (and adds
    # the OIDC scopes); for every other resource it returns them qualified and without OIDC scopes.
    bare_scope_names: bool = False

    def names(self, prefix: str) -> bool:
        wanted = prefix.rstrip("/").lower()
        return wanted == self.identifier.lower() or wanted in (alias.lower() for alias in self.aliases)

    def delegated_name(self, name: str) -> str | None:
        return next((known for known in self.delegated if known.lower() == name.lower()), None)


OUTLOOK = Resource(
    identifier="https://outlook.office.com",
    display_name="Office 365 Exchange Online",
    aliases=("https://outlook.office365.com", "00000002-0000-0ff1-ce00-000000000000"),
    delegated={
        "IMAP.AccessAsUser.All": "Read and write access to your mailboxes via IMAP",
        "POP.AccessAsUser.All": "Read and write access to your mailboxes via POP",
        "SMTP.Send": "Send email from your mailboxes using SMTP AUTH",
        "EWS.AccessAsUser.All": "Access your mailboxes via Exchange Web Services",
    },
    application=("IMAP.AccessAsApp", "POP.AccessAsApp", "SMTP.SendAsApp", "full_access_as_app"),
)
GRAPH = Resource(
    identifier="https://graph.microsoft.com",
    display_name="Microsoft Graph",
    aliases=("00000003-0000-0000-c000-000000000000",),
    delegated={
        "User.Read": "Sign you in and read your profile",
        "Mail.Read": "Read your mail",
        "Mail.ReadWrite": "Read and write access to your mail",
        "Mail.Send": "Send mail as you",
        "Mail.Read.Shared": "Read mail you can access, including shared mailboxes",
        "Mail.ReadWrite.Shared": "Read and write mail you can access, including shared mailboxes",
        "Mail.Send.Shared": "Send mail on behalf of others or as a shared mailbox",
    },
    application=("Mail.Read", "Mail.ReadWrite", "Mail.Send", "User.Read.All"),
    bare_scope_names=True,
)
RESOURCES = (OUTLOOK, GRAPH)
OIDC_SCOPES: Mapping[str, str] = {
    "openid": "Sign you in",
    "profile": "View your basic profile",
    "email": "View your email address",
    "offline_access": "Maintain access to data you have given it access to",
}


@dataclass(frozen=True)
class RequestedScope:
    """One resource permission from a `scope` parameter, e.g. Outlook's SMTP.Send."""

    resource: Resource
    audience: str  # the resource URI as the client named it: becomes the access token's `aud`
    permission: str  # canonical spelling, or ".default"

    @property
    def qualified(self) -> str:
        return f"{self.resource.identifier}/{self.permission}"


@dataclass(frozen=True)
class ScopeRequest:
    """A parsed `scope` parameter: resource permissions plus OpenID Connect scopes."""

    raw: str
    resource_scopes: tuple[RequestedScope, ...]
    oidc: frozenset[str]

    def resources(self) -> list[Resource]:
        found: list[Resource] = []
        for item in self.resource_scopes:
            if item.resource not in found:
                found.append(item.resource)
        return found

    def consent_names(self) -> set[str]:
        names = {item.qualified for item in self.resource_scopes if item.permission != ".default"}
        return names | set(self.oidc)


def parse_scopes(raw: str) -> ScopeRequest:
    """Parse a space-separated `scope` value the way the identity platform reads it."""
    resource_scopes: list[RequestedScope] = []
    oidc: set[str] = set()
    for item in raw.split():
        if item.lower() in OIDC_SCOPES:
            oidc.add(item.lower())
        else:
            resource_scopes.append(_parse_resource_scope(item, raw))
    if not resource_scopes and not oidc:
        raise ProtocolError(
            "invalid_request", 900144, "The request body must contain the following parameter: 'scope'."
        )
    return ScopeRequest(raw=raw, resource_scopes=tuple(dict.fromkeys(resource_scopes)), oidc=frozenset(oidc))


def _parse_resource_scope(item: str, raw: str) -> RequestedScope:
    prefix, separator, name = item.rpartition("/")
    if not separator:
        # A permission without a resource prefix means Microsoft Graph, as Microsoft reads it.
        prefix, name = GRAPH.identifier, item
    resource = next((candidate for candidate in RESOURCES if candidate.names(prefix)), None)
    if resource is None:
        raise ProtocolError(
            "invalid_resource",
            500011,
            f"The resource principal named {prefix} was not found in the tenant. This can happen if the "
            "application has not been installed by the administrator of the tenant or consented to by "
            "any user in the tenant. You might have sent your authentication request to the wrong tenant.",
        )
    audience = prefix.rstrip("/") if "://" in prefix else resource.identifier
    if name == ".default":
        return RequestedScope(resource, audience, ".default")
    canonical = resource.delegated_name(name)
    if canonical is None:
        raise ProtocolError(
            "invalid_scope",
            70011,
            f"The provided value for the input parameter 'scope' is not valid. The scope {raw} is not valid.",
        )
    return RequestedScope(resource, audience, canonical)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """An error the identity platform reports to the client, with Microsoft's fields."""

    def __init__(self, error: str, aadsts: int | None, description: str, *, status: int = 400) -> None:
        super().__init__(f"{error}: AADSTS{aadsts}: {description}")
        self.error = error
        self.aadsts = aadsts
        self.description = description
        self.status = status

    def full_description(self, diagnostics: Diagnostics) -> str:
        prefix = f"AADSTS{self.aadsts}: " if self.aadsts is not None else ""
        return f"{prefix}{self.description}{diagnostics.suffix()}"


class PageError(ProtocolError):
    """An authorize-endpoint error that Microsoft shows on its own page instead of redirecting.

    These are the errors where the redirect URI cannot be trusted yet (unknown app, unregistered
    redirect URI) or where the user, not the app, has to act (wrong tenant, admin approval needed).
    """


# AADSTS numbers whose injected failures are rendered as an error page rather than redirected.
PAGE_ERROR_CODES = frozenset(
    {50011, 50020, 50034, 50105, 50126, 50194, 53003, 90002, 90094, 700016, 9002332, 900971}
)


@dataclass(frozen=True)
class Diagnostics:
    """The Trace ID / Correlation ID / Timestamp trio Microsoft appends to every error."""

    trace_id: str
    correlation_id: str
    timestamp: datetime

    @property
    def stamp(self) -> str:
        return self.timestamp.strftime("%Y-%m-%d %H:%M:%SZ")

    def suffix(self) -> str:
        return (
            f"\r\nTrace ID: {self.trace_id}\r\nCorrelation ID: {self.correlation_id}"
            f"\r\nTimestamp: {self.stamp}"
        )


@dataclass(frozen=True)
class InjectedFailure:
    """An error in Microsoft's own shape (JSON body with AADSTS number, Trace and Correlation IDs)."""

    error: str
    aadsts: int | None
    description: str
    status: int
    # Seconds for a Retry-After header, as Microsoft sends with 429 (throttled) and some 503 answers.
    retry_after: int | None = None

    def as_error(self) -> ProtocolError:
        error_class = PageError if self.aadsts in PAGE_ERROR_CODES else ProtocolError
        return error_class(self.error, self.aadsts, self.description, status=self.status)


@dataclass(frozen=True)
class InjectedAnswer:
    """A raw answer in place of the token endpoint's own: what a proxy, load balancer or broken front
    end sends (an HTML error page, a truncated or empty body, JSON that is not an object)."""

    status: int
    body: bytes = field(repr=False)
    content_type: str
    retry_after: int | None = None

    def response(self) -> Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return Response(self.body, status_code=self.status, media_type=self.content_type, headers=headers)


@dataclass(frozen=True)
class InjectedDelay:
    """A pause before the call is handled as usual: a client whose timeout is shorter sees a hang.

    The request still runs when the pause ends, as on a slow real server; a refresh token redeemed
    then stays valid, because Microsoft does not revoke a refresh token when it is used."""

    seconds: float


InjectedFault = InjectedFailure | InjectedAnswer | InjectedDelay


# ---------------------------------------------------------------------------------------------
# The directory: tenants, users, app registrations, consents and issued grants
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    domain: str
    display_name: str
    # Entra ID lets tenants forbid user consent; sign-ins then need an admin (AADSTS90094).
    users_can_consent: bool = True


@dataclass(frozen=True)
class SandboxUser:
    oid: str
    tenant_id: str
    upn: str
    display_name: str
    is_admin: bool = False

    @property
    def email(self) -> str:
        return self.upn

    @property
    def given_name(self) -> str:
        return self.display_name.split(" ")[0]

    @property
    def family_name(self) -> str:
        return self.display_name.partition(" ")[2]


@dataclass(frozen=True)
class ClientSecret:
    secret_id: str
    value: str = field(repr=False)
    expires_at: datetime

    @property
    def hint(self) -> str:
        """The first three characters, which is all the Entra admin center shows after creation."""
        return self.value[:3]


@dataclass(frozen=True)
class ClientCertificate:
    """A public certificate uploaded to an app registration, for client assertions."""

    key_id: str
    pem: str
    thumbprint: str  # SHA-1, upper-case hex, as the Entra admin center shows it
    thumbprint_sha256: str
    public_key: CertificatePublicKeyTypes = field(repr=False)
    expires_at: datetime

    @classmethod
    def from_bytes(cls, certificate: bytes | str) -> ClientCertificate:
        """Accept a PEM or DER encoded X.509 certificate."""
        raw = certificate.encode("ascii") if isinstance(certificate, str) else certificate
        cert = (
            x509.load_pem_x509_certificate(raw)
            if raw.lstrip().startswith(b"-----")
            else x509.load_der_x509_certificate(raw)
        )
        return cls(
            key_id=_new_guid(),
            pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            thumbprint=cert.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 - the x5t header is SHA-1 by definition
            thumbprint_sha256=cert.fingerprint(hashes.SHA256()).hex().upper(),
            public_key=cert.public_key(),
            expires_at=cert.not_valid_after_utc,
        )

    def matches(self, *, x5t: str | None, x5t_s256: str | None) -> bool:
        # Thumbprints arrive base64url encoded, with or without padding (MSAL keeps the padding).
        if x5t_s256:
            return _b64url(bytes.fromhex(self.thumbprint_sha256)) == x5t_s256.rstrip("=")
        return bool(x5t) and _b64url(bytes.fromhex(self.thumbprint)) == (x5t or "").rstrip("=")


@dataclass
class RegisteredApp:
    """An Entra ID app registration with Web platform redirect URIs."""

    client_id: str
    home_tenant_id: str
    display_name: str
    sign_in_audience: SignInAudience
    redirect_uris: list[str]
    client_secrets: list[ClientSecret] = field(default_factory=list)
    certificates: list[ClientCertificate] = field(default_factory=list)
    # Application permissions (app roles) the app requests, resource-qualified, for example
    # "https://outlook.office.com/IMAP.AccessAsApp"; granted by admin consent in each tenant.
    application_permissions: list[str] = field(default_factory=list)

    @property
    def is_multitenant(self) -> bool:
        return self.sign_in_audience != "AzureADMyOrg"


@dataclass(frozen=True)
class Authority:
    """The `{tenant}` path segment of a request, resolved."""

    segment: str
    kind: AuthorityKind
    tenant: Tenant | None = None

    @property
    def tenant_id(self) -> str | None:
        return self.tenant.tenant_id if self.tenant else None

    @property
    def label(self) -> str:
        return self.tenant.display_name if self.tenant else self.segment


@dataclass
class PendingSignIn:
    """A validated /authorize request, kept server-side while the user goes through the pages."""

    flow_id: str
    authority: Authority
    client_id: str
    redirect_uri: str
    response_mode: ResponseMode
    state: str | None
    scopes: ScopeRequest
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    login_hint: str | None
    domain_hint: str | None
    prompt: str | None
    wants_client_info: bool
    created_at: datetime
    user_oid: str | None = None
    admin_consent_scope: str | None = None


@dataclass
class IssuedCode:
    code: str = field(repr=False)
    client_id: str
    redirect_uri: str
    user_oid: str
    scopes: ScopeRequest
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    authority: Authority
    session_id: str
    issued_at: datetime
    redeemed: bool = False


@dataclass
class RefreshGrant:
    """An opaque refresh token and what it stands for."""

    token: str = field(repr=False)
    client_id: str
    user_oid: str
    scope: str  # the `scope` of the token request that produced it, reused when a refresh names none
    session_id: str
    issued_at: datetime
    last_used_at: datetime


@dataclass(frozen=True)
class SigningKey:
    """The RSA key that signs every token, published in the JWKS with its certificate."""

    private_key: rsa.RSAPrivateKey = field(repr=False)
    certificate: x509.Certificate

    @classmethod
    def generate(cls) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "Postdesk sandbox token signing (not Microsoft)")]
        )
        now = _utcnow()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        return cls(private_key=key, certificate=cert)

    @property
    def kid(self) -> str:
        # Microsoft's kid equals the x5t: the base64url SHA-1 thumbprint of the signing certificate.
        return _b64url(self.certificate.fingerprint(hashes.SHA1()))  # noqa: S303 - x5t is SHA-1 by definition

    @property
    def public_key_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        numbers = self.private_key.public_key().public_numbers()
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.kid,
            "n": _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
            "x5c": [base64.b64encode(der).decode("ascii")],
        }

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(
            dict(claims), self.private_key, algorithm="RS256", headers={"kid": self.kid, "x5t": self.kid}
        )


def new_client_secret_value() -> str:
    """A secret value shaped like Entra ID's: 40 characters with ``Q~`` after a 4-character hint."""
    alphabet = string.ascii_letters + string.digits + "_-.~"
    head = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(4))
    return head + "Q~" + "".join(secrets.choice(alphabet) for _ in range(34))


class SandboxDirectory:
    """All state of the sandbox identity platform, in memory.

    The web app runs on the server thread while tests change the directory from theirs, so every
    method that changes state takes ``lock``.
    """

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        self.tenants: dict[str, Tenant] = {}
        self.users: dict[str, SandboxUser] = {}
        self.apps: dict[str, RegisteredApp] = {}
        self.user_consents: dict[tuple[str, str], set[str]] = {}
        self.admin_consents: set[tuple[str, str]] = set()
        self.codes: dict[str, IssuedCode] = {}
        self.refresh_tokens: dict[str, RefreshGrant] = {}
        # Like Entra ID's refreshTokensValidFromDateTime: grants issued before it are revoked.
        self.tokens_valid_from: dict[str, datetime] = {}
        self.pending: dict[str, PendingSignIn] = {}
        self.sessions: dict[str, str] = {}
        # Shared mailboxes (address -> display name) and delegates' rights on any mailbox:
        # (mailbox, delegate) -> {"FullAccess", "SendAs", "SendOnBehalf"}.
        self.shared_mailboxes: dict[str, str] = {}
        self.mailbox_rights: dict[tuple[str, str], set[str]] = {}
        self.clock: Callable[[], datetime] = clock or _utcnow
        self.clock_offset = timedelta(0)
        self.signing_key = SigningKey.generate()
        self.lock = threading.RLock()
        self._failures: dict[str, deque[InjectedFault]] = {"authorize": deque(), "token": deque()}
        # Set by `postdesk demo` when a sandbox mail server runs: (mailbox address, raw message) -> None.
        self.mail_delivery: Callable[[str, bytes], None] | None = None

    @classmethod
    def default(cls) -> SandboxDirectory:
        """Contoso with three users and Fabrikam with one, at fixed GUIDs."""
        directory = cls()
        directory.add_tenant(
            domain="contoso.onmicrosoft.com", display_name="Contoso", tenant_id=CONTOSO_TENANT_ID
        )
        directory.add_tenant(
            domain="fabrikam.onmicrosoft.com", display_name="Fabrikam", tenant_id=FABRIKAM_TENANT_ID
        )
        for oid, upn, name, admin in (
            (ADELE_OID, "adele.vance@contoso.onmicrosoft.com", "Adele Vance", False),
            (MEGAN_OID, "megan.bowen@contoso.onmicrosoft.com", "Megan Bowen", True),
            (SUPPORT_OID, "support@contoso.onmicrosoft.com", "Support desk", False),
        ):
            directory.add_user(
                upn=upn, display_name=name, tenant_id=CONTOSO_TENANT_ID, oid=oid, is_admin=admin
            )
        directory.add_user(
            upn="alex.wilber@fabrikam.onmicrosoft.com",
            display_name="Alex Wilber",
            tenant_id=FABRIKAM_TENANT_ID,
            oid=ALEX_OID,
            is_admin=True,
        )
        return directory

    def now(self) -> datetime:
        """The sandbox's idea of the current time: ``clock()`` moved by ``clock_offset``."""
        return self.clock() + self.clock_offset

    # -- directory objects -------------------------------------------------------------------

    def add_tenant(self, *, domain: str, display_name: str, tenant_id: str | None = None) -> Tenant:
        tenant = Tenant(tenant_id=tenant_id or _new_guid(), domain=domain.lower(), display_name=display_name)
        with self.lock:
            self.tenants[tenant.tenant_id] = tenant
        return tenant

    def add_user(
        self, *, upn: str, display_name: str, tenant_id: str, oid: str | None = None, is_admin: bool = False
    ) -> SandboxUser:
        if tenant_id not in self.tenants:
            raise KeyError(f"no tenant {tenant_id}")
        user = SandboxUser(oid or _new_guid(), tenant_id, upn.lower(), display_name, is_admin)
        with self.lock:
            self.users[user.oid] = user
        return user

    def register_app(
        self,
        *,
        display_name: str,
        redirect_uris: Iterable[str] = (),
        sign_in_audience: SignInAudience = "AzureADMyOrg",
        home_tenant_id: str = CONTOSO_TENANT_ID,
        client_id: str | None = None,
        with_secret: bool = True,
        certificates: Iterable[bytes | str] = (),
        application_permissions: Iterable[str] = (),
    ) -> RegisteredApp:
        """Register an app; unless ``with_secret`` is false it gets one client secret valid 180 days."""
        if sign_in_audience not in get_args(SignInAudience):
            raise ValueError(f"unknown sign-in audience {sign_in_audience!r}")
        if home_tenant_id not in self.tenants:
            raise KeyError(f"no tenant {home_tenant_id}")
        app = RegisteredApp(
            client_id=client_id or _new_guid(),
            home_tenant_id=home_tenant_id,
            display_name=display_name,
            sign_in_audience=sign_in_audience,
            redirect_uris=list(redirect_uris),
            certificates=[ClientCertificate.from_bytes(cert) for cert in certificates],
            application_permissions=list(application_permissions),
        )
        with self.lock:
            self.apps[app.client_id] = app
            if with_secret:
                self.add_client_secret(app.client_id)
        return app

    def add_client_secret(self, client_id: str, *, expires_at: datetime | None = None) -> ClientSecret:
        secret = ClientSecret(
            _new_guid(), new_client_secret_value(), expires_at or self.now() + SECRET_LIFETIME
        )
        with self.lock:
            self.apps[client_id].client_secrets.append(secret)
        return secret

    def add_certificate(self, client_id: str, certificate: bytes | str) -> ClientCertificate:
        credential = ClientCertificate.from_bytes(certificate)
        with self.lock:
            self.apps[client_id].certificates.append(credential)
        return credential

    def find_user(self, oid_or_upn: str) -> SandboxUser | None:
        wanted = oid_or_upn.lower()
        return self.users.get(wanted) or next((u for u in self.users.values() if u.upn == wanted), None)

    # -- shared mailboxes and delegates' rights ---------------------------------------------------

    def add_shared_mailbox(self, address: str, display_name: str) -> str:
        """A shared mailbox: an address with a mailbox but no account that can sign in."""
        with self.lock:
            self.shared_mailboxes[address.lower()] = display_name
        return address.lower()

    def grant_mailbox_rights(
        self, mailbox: str, delegate: str, *, full_access: bool = True, send_as: bool = True
    ) -> None:
        """What ``Add-MailboxPermission … FullAccess`` and ``Add-RecipientPermission … SendAs`` do."""
        wanted = [name for name, on in ((FULL_ACCESS, full_access), (SEND_AS, send_as)) if on]
        self.grant_mailbox_right(mailbox, delegate, *wanted)

    def revoke_mailbox_rights(
        self, mailbox: str, delegate: str, *, full_access: bool = True, send_as: bool = True
    ) -> None:
        unwanted = [name for name, on in ((FULL_ACCESS, full_access), (SEND_AS, send_as)) if on]
        self.revoke_mailbox_right(mailbox, delegate, *unwanted)

    def grant_mailbox_right(self, mailbox: str, delegate: str, *rights: str) -> None:
        with self.lock:
            self.mailbox_rights.setdefault((mailbox.lower(), delegate.lower()), set()).update(
                str(right) for right in rights
            )

    def revoke_mailbox_right(self, mailbox: str, delegate: str, *rights: str) -> None:
        with self.lock:
            self.mailbox_rights.get((mailbox.lower(), delegate.lower()), set()).difference_update(
                str(right) for right in rights
            )

    def rights_on(self, mailbox: str, delegate: str) -> set[str]:
        """The rights ``delegate`` holds on ``mailbox`` (none on its own: it owns that one)."""
        with self.lock:
            return set(self.mailbox_rights.get((mailbox.lower(), delegate.lower()), set()))

    def mailboxes_openable_by(self, upn: str) -> list[str]:
        """The user's own mailbox, then every mailbox it has FullAccess on."""
        with self.lock:
            delegated = sorted(
                mailbox
                for (mailbox, delegate), rights in self.mailbox_rights.items()
                if delegate == upn.lower() and FULL_ACCESS in rights
            )
        return [upn.lower(), *delegated]

    def mailboxes_openable_by_app(self, client_id: str, service_principal: str | None = None) -> list[str]:
        """The mailboxes an app has FullAccess on, granted to its client id or to its service principal
        (Exchange's ``Add-MailboxPermission -User`` names the service principal; both mean the app)."""
        holders = {client_id.lower(), *([service_principal.lower()] if service_principal else [])}
        with self.lock:
            return sorted(
                mailbox
                for (mailbox, delegate), rights in self.mailbox_rights.items()
                if delegate in holders and FULL_ACCESS in rights
            )

    def resolve_authority(self, segment: str) -> Authority | None:
        lowered = segment.lower()
        if lowered in ("common", "organizations", "consumers"):
            kind: AuthorityKind = lowered  # type: ignore[assignment]
            return Authority(segment, kind)
        tenant = self.tenants.get(lowered) or next(
            (t for t in self.tenants.values() if t.domain == lowered), None
        )
        return Authority(segment, "tenant", tenant) if tenant else None

    # -- consent -----------------------------------------------------------------------------

    def grant_consent(self, user_oid: str, client_id: str, scope_names: Iterable[str]) -> None:
        with self.lock:
            self.user_consents.setdefault((user_oid, client_id), set()).update(scope_names)

    def grant_admin_consent(self, tenant_id: str, client_id: str) -> None:
        with self.lock:
            self.admin_consents.add((tenant_id, client_id))

    def has_admin_consent(self, tenant_id: str, client_id: str) -> bool:
        return (tenant_id, client_id) in self.admin_consents

    def consented(self, user: SandboxUser, client_id: str) -> set[str]:
        """The scope names this user may get tokens for; admin consent covers every permission."""
        if self.has_admin_consent(user.tenant_id, client_id):
            every = {f"{r.identifier}/{name}" for r in RESOURCES for name in r.delegated}
            return every | set(OIDC_SCOPES)
        return set(self.user_consents.get((user.oid, client_id), set()))

    # -- failure injection, revocation, clock --------------------------------------------------

    def fail_next(
        self,
        endpoint: Endpoint,
        *,
        error: str,
        aadsts: int | None,
        description: str,
        status: int = 400,
        retry_after: int | None = None,
    ) -> None:
        """Make the next call to ``endpoint`` fail with exactly this error; calls queue up.

        ``retry_after`` (token endpoint only) adds a ``Retry-After: <seconds>`` header, as Microsoft
        sends when it throttles (status 429) or is briefly unavailable (503)."""
        failure = InjectedFailure(error, aadsts, description, status, retry_after)
        self._queue(endpoint, failure, token_only=retry_after is not None)

    def answer_next(
        self,
        endpoint: Literal["token"],
        *,
        status: int,
        body: bytes | str,
        content_type: str = "text/html; charset=utf-8",
        retry_after: int | None = None,
    ) -> None:
        """Make the next call to the token endpoint get this raw answer instead of Microsoft's JSON:
        for example a proxy's HTML error page, a cut-off JSON body, or garbage with status 200."""
        raw = body.encode("utf-8") if isinstance(body, str) else body
        self._queue(endpoint, InjectedAnswer(status, raw, content_type, retry_after), token_only=True)

    def delay_next(self, endpoint: Literal["token"], seconds: float) -> None:
        """Make the next call to the token endpoint wait ``seconds`` before it is answered as usual,
        so that a client with a shorter timeout sees the endpoint hang."""
        if not seconds >= 0:
            raise ValueError("seconds must be zero or more")
        self._queue(endpoint, InjectedDelay(float(seconds)), token_only=True)

    def _queue(self, endpoint: str, fault: InjectedFault, *, token_only: bool = False) -> None:
        if endpoint not in self._failures or (token_only and endpoint != "token"):
            allowed = "'token'" if token_only else "'authorize' or 'token'"
            raise ValueError(f"endpoint must be {allowed}, not {endpoint!r}")
        with self.lock:
            self._failures[endpoint].append(fault)

    def take_failure(self, endpoint: Endpoint) -> InjectedFault | None:
        """The next queued fault for ``endpoint``, removed from the queue (the authorize endpoint only
        ever has ``InjectedFailure`` queued)."""
        with self.lock:
            queue = self._failures[endpoint]
            return queue.popleft() if queue else None

    def revoke_refresh_tokens(self, user: str) -> int:
        """Revoke every refresh token and browser session of a user (oid or UPN), as Entra ID's
        revokeSignInSessions does; returns how many refresh tokens were affected."""
        found = self.find_user(user)
        if found is None:
            raise KeyError(f"no user {user}")
        with self.lock:
            self.tokens_valid_from[found.oid] = self.now()
            for session_id in [sid for sid, oid in self.sessions.items() if oid == found.oid]:
                del self.sessions[session_id]
            return sum(1 for grant in self.refresh_tokens.values() if grant.user_oid == found.oid)

    # -- grants ------------------------------------------------------------------------------

    def start_sign_in(self, pending: PendingSignIn) -> None:
        with self.lock:
            cutoff = self.now() - PENDING_SIGN_IN_LIFETIME
            for flow_id in [k for k, v in self.pending.items() if v.created_at < cutoff]:
                del self.pending[flow_id]
            self.pending[pending.flow_id] = pending

    def find_pending(self, flow_id: str) -> PendingSignIn | None:
        pending = self.pending.get(flow_id)
        if pending is None or pending.created_at < self.now() - PENDING_SIGN_IN_LIFETIME:
            return None
        return pending

    def finish_sign_in(self, flow_id: str) -> None:
        with self.lock:
            self.pending.pop(flow_id, None)

    def open_session(self, user_oid: str) -> str:
        session_id = secrets.token_urlsafe(24)
        with self.lock:
            self.sessions[session_id] = user_oid
        return session_id

    def issue_code(self, pending: PendingSignIn, user: SandboxUser, session_id: str) -> IssuedCode:
        issued = IssuedCode(
            code=secrets.token_urlsafe(64),
            client_id=pending.client_id,
            redirect_uri=pending.redirect_uri,
            user_oid=user.oid,
            scopes=pending.scopes,
            code_challenge=pending.code_challenge,
            code_challenge_method=pending.code_challenge_method,
            nonce=pending.nonce,
            authority=pending.authority,
            session_id=session_id,
            issued_at=self.now(),
        )
        with self.lock:
            self.codes[issued.code] = issued
        return issued

    def issue_refresh_token(self, *, client_id: str, user_oid: str, scope: str, session_id: str) -> str:
        now = self.now()
        grant = RefreshGrant(secrets.token_urlsafe(96), client_id, user_oid, scope, session_id, now, now)
        with self.lock:
            self.refresh_tokens[grant.token] = grant
        return grant.token


# ---------------------------------------------------------------------------------------------
# The token endpoint: client authentication, grants and token minting
# ---------------------------------------------------------------------------------------------


def missing_parameter(name: str) -> ProtocolError:
    return ProtocolError(
        "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'."
    )


def app_not_found(client_id: str, authority: Authority, *, page: bool = False) -> ProtocolError:
    error_class = PageError if page else ProtocolError
    return error_class(
        "unauthorized_client",
        700016,
        f"Application with identifier '{client_id}' was not found in the directory '{authority.label}'. This "
        "can happen if the application has not been installed by the administrator of the tenant or "
        "consented to by any user in the tenant. You may have sent your authentication request to the "
        "wrong tenant.",
    )


def check_app_for_authority(app: RegisteredApp, authority: Authority, *, page: bool) -> None:
    """Apply the sign-in audience rules Microsoft enforces per tenant path segment."""
    error_class = PageError if page else ProtocolError
    if authority.kind == "consumers" and app.sign_in_audience != "AzureADandPersonalMicrosoftAccount":
        raise error_class(
            "invalid_request",
            9002332,
            f"Application '{app.client_id}'({app.display_name}) is configured for use by Azure Active "
            "Directory users only. Please do not use the /consumers endpoint to serve this request.",
        )
    if authority.kind in ("common", "organizations") and not app.is_multitenant:
        raise error_class(
            "invalid_request",
            50194,
            f"Application '{app.client_id}'({app.display_name}) is not configured as a multi-tenant "
            "application. Usage of the /common endpoint is not supported for such applications created "
            "after '10/15/2018'. Use a tenant-specific endpoint or configure the application to be "
            "multi-tenant.",
        )
    if authority.kind == "tenant" and not app.is_multitenant and authority.tenant_id != app.home_tenant_id:
        raise app_not_found(app.client_id, authority, page=page)


def user_not_in_tenant(
    user: SandboxUser, app: RegisteredApp, authority: Authority, *, page: bool
) -> ProtocolError:
    error_class = PageError if page else ProtocolError
    return error_class(
        "invalid_request" if page else "invalid_grant",
        50020,
        f"User account '{user.upn}' from identity provider 'https://sts.windows.net/{user.tenant_id}/' does "
        f"not exist in tenant '{authority.label}' and cannot access the application "
        f"'{app.client_id}'({app.display_name}) in that tenant. The account needs to be added as an "
        "external user in the tenant first. Sign out and sign in again with a different Azure Active "
        "Directory user account.",
    )


def pkce_matches(verifier: str, challenge: str, method: str | None) -> bool:
    if (method or "plain").upper() == "S256":
        computed = _b64url(hashlib.sha256(verifier.encode("ascii", "replace")).digest())
    else:
        computed = verifier
    return hmac.compare_digest(computed, challenge)


def pairwise_subject(user_oid: str, client_id: str) -> str:
    """Microsoft's `sub` is unique per user and app, so apps cannot correlate users through it."""
    return _b64url(hashlib.sha256(f"{user_oid}:{client_id}".encode()).digest())


@dataclass(frozen=True)
class TokenRequest:
    """One POST to the token endpoint, with what the grant handlers need."""

    directory: SandboxDirectory
    authority: Authority
    base_url: str
    fields: Mapping[str, str]
    authorization_header: str | None
    client_ip: str

    def require(self, name: str) -> str:
        value = self.fields.get(name)
        if not value:
            raise missing_parameter(name)
        return value

    def token_endpoint_urls(self) -> set[str]:
        names = {self.authority.segment}
        if self.authority.tenant:
            names |= {self.authority.tenant.tenant_id, self.authority.tenant.domain}
        return {f"{self.base_url}/{name}/oauth2/v2.0/token" for name in names}


@dataclass(frozen=True)
class AuthenticatedClient:
    app: RegisteredApp
    appidacr: str  # "1": client secret, "2": certificate — the v1 claim resource servers read


def authenticate_client(request: TokenRequest) -> AuthenticatedClient:
    basic_id, basic_secret = _basic_credentials(request.authorization_header)
    client_id = request.fields.get("client_id") or basic_id
    if not client_id:
        raise missing_parameter("client_id")
    app = request.directory.apps.get(client_id)
    if app is None:
        raise app_not_found(client_id, request.authority)
    check_app_for_authority(app, request.authority, page=False)
    if request.fields.get("client_assertion"):
        _verify_client_assertion(request, app)
        return AuthenticatedClient(app, "2")
    secret = request.fields.get("client_secret") or basic_secret
    if secret:
        _verify_client_secret(request.directory, app, secret)
        return AuthenticatedClient(app, "1")
    raise ProtocolError(
        "invalid_client",
        7000218,
        "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        status=401,
    )


def _basic_credentials(header: str | None) -> tuple[str | None, str | None]:
    if not header or not header.lower().startswith("basic "):
        return None, None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None, None
    client_id, _, secret = decoded.partition(":")
    # RFC 6749 section 2.3.1: both parts are form-urlencoded before being joined.
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))


def _verify_client_secret(directory: SandboxDirectory, app: RegisteredApp, secret: str) -> None:
    for candidate in app.client_secrets:
        if hmac.compare_digest(candidate.value.encode(), secret.encode()):
            if candidate.expires_at <= directory.now():
                raise ProtocolError(
                    "invalid_client",
                    7000222,
                    f"The provided client secret keys for app '{app.client_id}' are expired. Visit the Azure "
                    "portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider "
                    "using certificate credentials for added security: https://aka.ms/certCreds.",
                    status=401,
                )
            return
    raise ProtocolError(
        "invalid_client",
        7000215,
        "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
        f"value, not the client secret ID, for a secret added to app '{app.client_id}'.",
        status=401,
    )


def _verify_client_assertion(request: TokenRequest, app: RegisteredApp) -> None:
    assertion = request.fields["client_assertion"]
    if request.fields.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
        raise ProtocolError(
            "invalid_request",
            90014,
            "The required field 'client_assertion_type' is missing from the credential.",
        )
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError as exc:
        raise ProtocolError(
            "invalid_client", 50027, "JWT token is invalid or malformed.", status=401
        ) from exc
    x5t, x5t_s256 = header.get("x5t"), header.get("x5t#S256")
    certificate = next((c for c in app.certificates if c.matches(x5t=x5t, x5t_s256=x5t_s256)), None)
    if certificate is None:
        raise _assertion_key_not_found(app, x5t_s256 or x5t)
    try:
        claims = jwt.decode(
            assertion,
            certificate.public_key,  # type: ignore[arg-type]
            algorithms=["RS256", "PS256"],
            options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.PyJWTError as exc:
        raise ProtocolError(
            "invalid_client", 700027, "Client assertion failed signature validation.", status=401
        ) from exc
    _check_assertion_claims(request, app, claims)


def _assertion_key_not_found(app: RegisteredApp, thumbprint: str | None) -> ProtocolError:
    try:
        shown = base64.urlsafe_b64decode((thumbprint or "") + "==").hex().upper()
    except ValueError:
        shown = "unknown"
    return ProtocolError(
        "invalid_client",
        700027,
        f"Client assertion failed signature validation. [Reason - The key was not found., Thumbprint of key "
        f"used by client: '{shown}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph "
        f"to see configured keys for app Id '{app.client_id}'.]",
        status=401,
    )


def _check_assertion_claims(request: TokenRequest, app: RegisteredApp, claims: Mapping[str, Any]) -> None:
    if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
        raise ProtocolError(
            "invalid_client",
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.",
            status=401,
        )
    audiences = claims.get("aud")
    audience_list = audiences if isinstance(audiences, list) else [audiences]
    if not request.token_endpoint_urls() & {str(a) for a in audience_list}:
        raise ProtocolError(
            "invalid_client", 50013, "Assertion audience claim does not match the required value.", status=401
        )
    now = request.directory.now().timestamp()
    leeway = ASSERTION_LEEWAY.total_seconds()
    expires, not_before = float(claims.get("exp", 0)), float(claims.get("nbf", 0))
    if expires + leeway < now or not_before - leeway > now:
        raise ProtocolError(
            "invalid_client", 700024, "Client assertion is not within its valid time range.", status=401
        )


def redeem_authorization_code(request: TokenRequest, client: AuthenticatedClient) -> dict[str, Any]:
    directory = request.directory
    issued = directory.codes.get(request.require("code"))
    if issued is None:
        raise ProtocolError("invalid_grant", 70000, "Provided grant is invalid or malformed.")
    with directory.lock:
        _check_code(request, client, issued)
        issued.redeemed = True
    user = directory.users[issued.user_oid]
    scope = request.fields.get("scope")
    scopes = parse_scopes(scope) if scope else issued.scopes
    return user_token_response(
        request, client, user, scopes, nonce=issued.nonce, session_id=issued.session_id, rotate=False
    )


def _check_code(request: TokenRequest, client: AuthenticatedClient, issued: IssuedCode) -> None:
    if issued.redeemed:
        raise ProtocolError(
            "invalid_grant",
            54005,
            "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an "
            "existing refresh token.",
        )
    if issued.client_id != client.app.client_id:
        raise ProtocolError(
            "invalid_grant", 70000, "Provided grant is invalid or malformed. It was issued to another client."
        )
    if request.directory.now() - issued.issued_at > CODE_LIFETIME:
        raise ProtocolError(
            "invalid_grant",
            70008,
            "The provided authorization code or refresh token has expired due to inactivity. Send a new "
            "interactive authorization request for this user and resource.",
        )
    if not _code_fits_authority(issued, request.authority, request.directory.users[issued.user_oid]):
        raise ProtocolError(
            "invalid_grant",
            700005,
            "Provided Authorization Code is intended to use against other tenant, thus rejected.",
        )
    redirect_uri = request.require("redirect_uri")
    if redirect_uri != issued.redirect_uri:
        raise ProtocolError(
            "invalid_grant",
            50011,
            f"The redirect URI '{redirect_uri}' specified in the request does not match the redirect URI "
            f"'{issued.redirect_uri}' that was used to request the authorization code.",
        )
    verifier = request.fields.get("code_verifier")
    if issued.code_challenge and not (
        verifier and pkce_matches(verifier, issued.code_challenge, issued.code_challenge_method)
    ):
        raise ProtocolError(
            "invalid_grant",
            501481,
            "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
        )


def _code_fits_authority(issued: IssuedCode, authority: Authority, user: SandboxUser) -> bool:
    # A code must be redeemed against the tenant it was acquired for; one from /common or
    # /organizations may also be redeemed at the signed-in user's own tenant.
    if issued.authority.kind == "tenant":
        return authority.tenant_id == issued.authority.tenant_id
    return authority.kind in ("common", "organizations") or authority.tenant_id == user.tenant_id


def redeem_refresh_token(request: TokenRequest, client: AuthenticatedClient) -> dict[str, Any]:
    directory = request.directory
    grant = directory.refresh_tokens.get(request.require("refresh_token"))
    if grant is None:
        raise ProtocolError("invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
    with directory.lock:
        _check_refresh_grant(directory, client, grant)
        # Microsoft does not revoke a refresh token when it is used: the old one stays valid
        # alongside the new one returned below, until it is revoked or left idle for 90 days.
        grant.last_used_at = directory.now()
    user = directory.users[grant.user_oid]
    scopes = parse_scopes(request.fields.get("scope") or grant.scope)
    return user_token_response(
        request, client, user, scopes, nonce=None, session_id=grant.session_id, rotate=True
    )


def _check_refresh_grant(
    directory: SandboxDirectory, client: AuthenticatedClient, grant: RefreshGrant
) -> None:
    if grant.client_id != client.app.client_id:
        raise ProtocolError(
            "invalid_grant", 70000, "Provided grant is invalid or malformed. It was issued to another client."
        )
    valid_from = directory.tokens_valid_from.get(grant.user_oid)
    if valid_from is not None and grant.issued_at < valid_from:
        raise ProtocolError(
            "invalid_grant",
            50173,
            "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user "
            f"might have changed or reset their password. The grant was issued on '{_iso(grant.issued_at)}' "
            "and the TokensValidFrom date (before which tokens are not valid) for this user is "
            f"'{_iso(valid_from)}'.",
        )
    idle = directory.now() - grant.last_used_at
    if idle > REFRESH_TOKEN_MAX_INACTIVE:
        raise ProtocolError(
            "invalid_grant",
            700082,
            "The refresh token has expired due to inactivity. The token was issued on "
            f"{_iso(grant.issued_at)} "
            f"and was inactive for {REFRESH_TOKEN_MAX_INACTIVE.days}.00:00:00.",
        )


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


def user_token_response(
    request: TokenRequest,
    client: AuthenticatedClient,
    user: SandboxUser,
    scopes: ScopeRequest,
    *,
    nonce: str | None,
    session_id: str,
    rotate: bool,
) -> dict[str, Any]:
    """Tokens for a signed-in user: access token always, id_token with openid, refresh token with
    offline_access (and on every refresh, which always hands out a new one)."""
    directory, app = request.directory, client.app
    if request.authority.kind == "tenant" and request.authority.tenant_id != user.tenant_id:
        raise user_not_in_tenant(user, app, request.authority, page=False)
    resource, audience, permissions = _delegated_target(directory, app, user, scopes)
    body: dict[str, Any] = {
        "token_type": "Bearer",
        "scope": _response_scope(resource, audience, permissions, scopes.oidc),
        "expires_in": int(ACCESS_TOKEN_LIFETIME.total_seconds()),
        "ext_expires_in": int(ACCESS_TOKEN_LIFETIME.total_seconds()),
        "access_token": _delegated_access_token(
            request,
            client,
            user,
            audience=audience,
            scp=_scp(resource, permissions, scopes.oidc),
            session_id=session_id,
        ),
    }
    if "offline_access" in scopes.oidc or rotate:
        body["refresh_token"] = directory.issue_refresh_token(
            client_id=app.client_id, user_oid=user.oid, scope=scopes.raw, session_id=session_id
        )
    if "openid" in scopes.oidc:
        body["id_token"] = _id_token(request, app, user, scopes.oidc, nonce=nonce, session_id=session_id)
    if request.fields.get("client_info") == "1":
        body["client_info"] = _b64url(json.dumps({"uid": user.oid, "utid": user.tenant_id}).encode())
    return body


def _delegated_target(
    directory: SandboxDirectory, app: RegisteredApp, user: SandboxUser, scopes: ScopeRequest
) -> tuple[Resource, str, list[str]]:
    resources = scopes.resources()
    if len(resources) > 1:
        raise ProtocolError(
            "invalid_scope",
            28000,
            "Provided value for the input parameter scope is not valid because it contains more than one "
            f"resource. Scope {scopes.raw} is not valid.",
        )
    if not resources:
        # OIDC scopes alone still yield an access token: Microsoft issues one for Graph's User.Read.
        return GRAPH, GRAPH.identifier, ["User.Read"]
    resource, audience = resources[0], scopes.resource_scopes[0].audience
    allowed = directory.consented(user, app.client_id)
    permissions = [s.permission for s in scopes.resource_scopes if s.permission != ".default"]
    if len(permissions) < len(scopes.resource_scopes):
        prefix = f"{resource.identifier}/"
        permissions += sorted(name.removeprefix(prefix) for name in allowed if name.startswith(prefix))
    missing = [p for p in permissions if f"{resource.identifier}/{p}" not in allowed]
    if missing or not permissions:
        raise ProtocolError(
            "invalid_grant",
            65001,
            f"The user or administrator has not consented to use the application with ID '{app.client_id}' "
            f"named '{app.display_name}'. Send an interactive authorization request for this user and "
            "resource.",
        )
    return resource, audience, list(dict.fromkeys(permissions))


def _response_scope(resource: Resource, audience: str, permissions: list[str], oidc: frozenset[str]) -> str:
    if resource.bare_scope_names:
        oidc_names: list[str] = [name for name in ("profile", "openid", "email") if name in oidc]
        return " ".join(permissions + oidc_names)
    return " ".join(f"{audience}/{name}" for name in permissions)


def _scp(resource: Resource, permissions: list[str], oidc: frozenset[str]) -> str:
    # Graph tokens list the OIDC scopes in `scp` too; tokens for other resources do not.
    extra: list[str] = [n for n in ("openid", "profile", "email") if n in oidc] if resource is GRAPH else []
    return " ".join(permissions + extra)


def _time_claims(now: datetime, lifetime: timedelta) -> dict[str, int]:
    issued = int(now.timestamp())
    return {"iat": issued, "nbf": issued, "exp": issued + int(lifetime.total_seconds())}


def _delegated_access_token(
    request: TokenRequest,
    client: AuthenticatedClient,
    user: SandboxUser,
    *,
    audience: str,
    scp: str,
    session_id: str,
) -> str:
    # Outlook and Graph tokens are v1.0 tokens even when requested from the v2.0 endpoint, so they
    # carry the sts.windows.net issuer and the v1 claim set (upn, unique_name, appid, scp).
    claims = {
        "aud": audience,
        "iss": f"https://sts.windows.net/{user.tenant_id}/",
        **_time_claims(request.directory.now(), ACCESS_TOKEN_LIFETIME),
        "acct": 0,
        "acr": "1",
        "aio": secrets.token_urlsafe(24),
        "amr": ["pwd"],
        "app_displayname": client.app.display_name,
        "appid": client.app.client_id,
        "appidacr": client.appidacr,
        "family_name": user.family_name,
        "given_name": user.given_name,
        "idtyp": "user",
        "ipaddr": request.client_ip,
        "name": user.display_name,
        "oid": user.oid,
        "scp": scp,
        "sid": session_id,
        "sub": pairwise_subject(user.oid, client.app.client_id),
        "tid": user.tenant_id,
        "unique_name": user.upn,
        "upn": user.upn,
        "uti": secrets.token_urlsafe(16),
        "ver": "1.0",
    }
    return request.directory.signing_key.sign(claims)


def _id_token(
    request: TokenRequest,
    app: RegisteredApp,
    user: SandboxUser,
    oidc: frozenset[str],
    *,
    nonce: str | None,
    session_id: str,
) -> str:
    claims: dict[str, Any] = {
        "aud": app.client_id,
        "iss": f"{request.base_url}/{user.tenant_id}/v2.0",
        **_time_claims(request.directory.now(), ID_TOKEN_LIFETIME),
        "oid": user.oid,
        "sid": session_id,
        "sub": pairwise_subject(user.oid, app.client_id),
        "tid": user.tenant_id,
        "uti": secrets.token_urlsafe(16),
        "ver": "2.0",
    }
    if "profile" in oidc:
        claims |= {"name": user.display_name, "preferred_username": user.upn}
    if "email" in oidc:
        claims["email"] = user.email
    if nonce is not None:
        claims["nonce"] = nonce
    return request.directory.signing_key.sign(claims)


def grant_client_credentials(request: TokenRequest, client: AuthenticatedClient) -> dict[str, Any]:
    raw = request.require("scope")
    if any(not item.endswith("/.default") for item in raw.split()):
        raise ProtocolError(
            "invalid_scope",
            1002012,
            f"The provided value for scope {raw} is not valid. Client credential flows must have a scope "
            "value with /.default suffixed to the resource identifier (application ID URI).",
        )
    scopes = parse_scopes(raw)
    if len(scopes.resource_scopes) != 1:
        raise ProtocolError(
            "invalid_scope",
            70011,
            f"The provided value for the input parameter 'scope' is not valid. The scope {raw} is not valid.",
        )
    tenant_id = request.authority.tenant_id or client.app.home_tenant_id
    if tenant_id != client.app.home_tenant_id and not request.directory.has_admin_consent(
        tenant_id, client.app.client_id
    ):
        raise app_not_found(client.app.client_id, request.authority)
    target = scopes.resource_scopes[0]
    return {
        "token_type": "Bearer",
        "expires_in": int(ACCESS_TOKEN_LIFETIME.total_seconds()),
        "ext_expires_in": int(ACCESS_TOKEN_LIFETIME.total_seconds()),
        "access_token": _app_access_token(request, client, target, tenant_id),
    }


def _app_access_token(
    request: TokenRequest, client: AuthenticatedClient, target: RequestedScope, tenant_id: str
) -> str:
    # The app acts as its service principal in the tenant: a stable id per (app, tenant).
    service_principal = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{client.app.client_id}/{tenant_id}"))
    roles = [
        permission.rpartition("/")[2]
        for permission in client.app.application_permissions
        if target.resource.names(permission.rpartition("/")[0])
    ]
    claims: dict[str, Any] = {
        "aud": target.audience,
        "iss": f"https://sts.windows.net/{tenant_id}/",
        **_time_claims(request.directory.now(), ACCESS_TOKEN_LIFETIME),
        "aio": secrets.token_urlsafe(24),
        "app_displayname": client.app.display_name,
        "appid": client.app.client_id,
        "appidacr": client.appidacr,
        "idp": f"https://sts.windows.net/{tenant_id}/",
        "idtyp": "app",
        "oid": service_principal,
        "sub": service_principal,
        "tid": tenant_id,
        "uti": secrets.token_urlsafe(16),
        "ver": "1.0",
    }
    if roles:
        claims["roles"] = roles
    return request.directory.signing_key.sign(claims)


GRANTS: Mapping[str, Callable[[TokenRequest, AuthenticatedClient], dict[str, Any]]] = {
    "authorization_code": redeem_authorization_code,
    "refresh_token": redeem_refresh_token,
    "client_credentials": grant_client_credentials,
}


def handle_token_request(request: TokenRequest) -> dict[str, Any]:
    """Run one token request; raises ProtocolError with Microsoft's error for anything refused."""
    grant_type = request.require("grant_type")
    grant = GRANTS.get(grant_type)
    if grant is None:
        raise ProtocolError(
            "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant_type}'."
        )
    if grant_type == "client_credentials" and request.authority.kind in ("common", "consumers"):
        raise ProtocolError(
            "invalid_request",
            9001023,
            "The grant type isn't supported over the /common or /consumers endpoints. Please use the "
            "/organizations or tenant-specific endpoint.",
        )
    return grant(request, authenticate_client(request))


def introspect(directory: SandboxDirectory, token: str) -> dict[str, Any]:
    """RFC 7662 introspection of a sandbox access token (for Dovecot's oauth2 passdb)."""
    try:
        claims = jwt.decode(
            token,
            directory.signing_key.private_key.public_key(),
            algorithms=["RS256"],
            options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.PyJWTError:
        return {"active": False}
    # Only access tokens count: id_tokens are signed with the same key but are not credentials.
    is_access_token = claims.get("ver") == "1.0" and ("scp" in claims or "roles" in claims)
    if not is_access_token or float(claims.get("exp", 0)) <= directory.now().timestamp():
        return {"active": False}
    scope = claims.get("scp") or " ".join(claims.get("roles", []))
    answer: dict[str, Any] = {
        "active": True,
        "scope": scope,
        "client_id": claims.get("appid"),
        "token_type": "Bearer",
        "exp": claims["exp"],
        "iat": claims.get("iat"),
        "nbf": claims.get("nbf"),
        "sub": claims.get("sub"),
        "aud": claims.get("aud"),
        "iss": claims.get("iss"),
        "tid": claims.get("tid"),
        "oid": claims.get("oid"),
    }
    if "upn" in claims:
        answer |= {"username": claims["upn"], "upn": claims["upn"], "email": claims["upn"]}
        # Dovecot 2.3 cannot tell this endpoint which mailbox is being opened (introspection_url takes
        # no %variables), so the answer lists what the token's user may open, comma-delimited for a
        # wildcard match on ",<login user>,"; see mailserver.py.
        answer["mailboxes"] = "," + ",".join(directory.mailboxes_openable_by(str(claims["upn"]))) + ","
    elif claims.get("idtyp") == "app":
        answer |= _app_introspection(directory, claims)
    return answer


# The Exchange Online application permission (app role) that opens mailboxes over IMAP.
IMAP_APP_ROLE = "IMAP.AccessAsApp"


def _app_introspection(directory: SandboxDirectory, claims: Mapping[str, Any]) -> dict[str, Any]:
    """The app-only part of an introspection answer.

    ``username`` is the client id: RFC 7662's resource owner of a client credentials token is the client
    itself, and Dovecot's oauth2 passdb needs a username in every answer (without one it reports an
    internal failure, which would turn a refusal into "try again later"). No mailbox address ever equals
    it, so only mailserver.py's app passdb, which checks ``mailboxes``, can let an app token in. Those
    are listed only for an Outlook token carrying IMAP.AccessAsApp, as Exchange Online opens a mailbox
    for an app only with that role and the app's FullAccess on the mailbox."""
    client_id = str(claims.get("appid") or "")
    answer: dict[str, Any] = {"username": client_id}
    roles = claims.get("roles")
    if OUTLOOK.names(str(claims.get("aud") or "")) and isinstance(roles, list) and IMAP_APP_ROLE in roles:
        openable = directory.mailboxes_openable_by_app(client_id, str(claims.get("oid") or "") or None)
        answer["mailboxes"] = "," + ",".join(openable) + ","
    return answer


# ---------------------------------------------------------------------------------------------
# The web app
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyTarget:
    """Where and how the authorize endpoint answers the app."""

    redirect_uri: str
    response_mode: ResponseMode
    state: str | None


def tenant_not_found(segment: str, *, error: str = "invalid_request", page: bool = False) -> ProtocolError:
    error_class = PageError if page else ProtocolError
    return error_class(
        error,
        90002,
        f"Tenant '{segment}' not found. Check to make sure you have the correct tenant ID and are signing "
        "into the correct cloud. Check with your subscription administrator, this may happen if there are "
        "no active subscriptions for the tenant.",
    )


def _form_fields(form: FormData) -> dict[str, str]:
    return {name: value for name, value in form.items() if isinstance(value, str)}


def _client_info(user: SandboxUser) -> str:
    return _b64url(json.dumps({"uid": user.oid, "utid": user.tenant_id}).encode())


class IdentityPlatform:
    """The HTTP side of the sandbox: one method per endpoint, all reading one SandboxDirectory."""

    def __init__(self, directory: SandboxDirectory) -> None:
        self.directory = directory
        self.templates = Environment(
            loader=FileSystemLoader(TEMPLATES_DIR),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )

    # -- shared helpers ----------------------------------------------------------------------

    @staticmethod
    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def authority(self, request: Request) -> Authority | None:
        return self.directory.resolve_authority(request.path_params["tenant"])

    def diagnostics(self, request: Request) -> Diagnostics:
        correlation = request.headers.get("client-request-id", "")
        try:
            correlation = str(uuid.UUID(correlation))
        except ValueError:
            correlation = _new_guid()
        return Diagnostics(_new_guid(), correlation, self.directory.now())

    def error_json(self, request: Request, exc: ProtocolError) -> JSONResponse:
        diagnostics = self.diagnostics(request)
        body: dict[str, Any] = {"error": exc.error, "error_description": exc.full_description(diagnostics)}
        if exc.aadsts is not None:
            body["error_codes"] = [exc.aadsts]
        body |= {
            "timestamp": diagnostics.stamp,
            "trace_id": diagnostics.trace_id,
            "correlation_id": diagnostics.correlation_id,
        }
        if exc.aadsts is not None:
            body["error_uri"] = f"{self.base_url(request)}/error?code={exc.aadsts}"
        headers = {"client-request-id": diagnostics.correlation_id, "x-ms-request-id": diagnostics.trace_id}
        return JSONResponse(body, status_code=exc.status, headers=headers | NO_STORE)

    def page(
        self, template: str, *, status: int = 200, form_target: str | None = None, **context: Any
    ) -> HTMLResponse:
        html = self.templates.get_template(template).render(**context)
        # Pages never run scripts and only post forms to the sandbox itself or, for
        # response_mode=form_post, to the app's registered redirect URI.
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(form_target)) if form_target else ""
        policy = (
            "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; "
            f"frame-ancestors 'none'; form-action 'self' {origin}".rstrip()
        )
        headers = {
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }
        return HTMLResponse(html, status_code=status, headers=headers | NO_STORE)

    def error_page(self, request: Request, exc: ProtocolError) -> HTMLResponse:
        diagnostics = self.diagnostics(request)
        return self.page(
            "error.html",
            status=exc.status,
            title="Sign-in error",
            error=exc.error,
            aadsts=exc.aadsts,
            description=exc.description,
            diagnostics=diagnostics,
        )

    def reply(
        self, target: ReplyTarget, params: Mapping[str, str], *, session_id: str | None = None
    ) -> Response:
        values = dict(params)
        if target.state is not None:
            values["state"] = target.state
        response: Response
        if target.response_mode == "form_post":
            response = self.page(
                "form_post.html",
                title="Continue",
                action=target.redirect_uri,
                fields=values,
                form_target=target.redirect_uri,
            )
        else:
            separator = (
                "#" if target.response_mode == "fragment" else ("&" if "?" in target.redirect_uri else "?")
            )
            response = RedirectResponse(target.redirect_uri + separator + urlencode(values), status_code=302)
        if session_id is not None:
            response.set_cookie(SESSION_COOKIE, session_id, secure=True, httponly=True, samesite="lax")
        return response

    def reply_error(
        self, request: Request, target: ReplyTarget, exc: ProtocolError, **extra: str
    ) -> Response:
        params = {
            **extra,
            "error": exc.error,
            "error_description": exc.full_description(self.diagnostics(request)),
        }
        if exc.aadsts is not None:
            params["error_uri"] = f"{self.base_url(request)}/error?code={exc.aadsts}"
        return self.reply(target, params)

    # -- discovery ---------------------------------------------------------------------------

    async def openid_configuration(self, request: Request) -> Response:
        authority = self.authority(request)
        if authority is None:
            return self.error_json(
                request, tenant_not_found(request.path_params["tenant"], error="invalid_tenant")
            )
        base = self.base_url(request)
        # A tenant named by domain is answered with GUID-based endpoints, as Microsoft does.
        segment = authority.tenant_id or authority.segment.lower()
        return JSONResponse(
            {
                "token_endpoint": f"{base}/{segment}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/{segment}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/{self._issuer_tenant(authority)}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{base}/{segment}/oauth2/v2.0/authorize",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/{segment}/oauth2/v2.0/logout",
                "claims_supported": [
                    "sub",
                    "iss",
                    "cloud_instance_name",
                    "cloud_instance_host_name",
                    "cloud_graph_host_name",
                    "msgraph_host",
                    "aud",
                    "exp",
                    "iat",
                    "auth_time",
                    "acr",
                    "nonce",
                    "preferred_username",
                    "name",
                    "tid",
                    "ver",
                    "at_hash",
                    "c_hash",
                    "email",
                ],
                "tenant_region_scope": "NA" if authority.tenant else None,
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
                "rbac_url": "https://pas.windows.net",
            }
        )

    @staticmethod
    def _issuer_tenant(authority: Authority) -> str:
        if authority.tenant_id:
            return authority.tenant_id
        # Multi-tenant metadata carries a placeholder the app replaces with the token's `tid`.
        return CONSUMERS_TENANT_ID if authority.kind == "consumers" else "{tenantid}"

    async def keys(self, request: Request) -> Response:
        authority = self.authority(request)
        if authority is None:
            return self.error_json(
                request, tenant_not_found(request.path_params["tenant"], error="invalid_tenant")
            )
        key = self.directory.signing_key.jwk()
        if request.url.path.endswith("/v2.0/keys"):
            key["issuer"] = f"{self.base_url(request)}/{self._issuer_tenant(authority)}/v2.0"
        return JSONResponse({"keys": [key]})

    async def instance_discovery(self, request: Request) -> Response:
        host = request.url.netloc
        endpoint = request.query_params.get("authorization_endpoint")
        tenant_path = "{tenant}/v2.0"
        if endpoint:
            parts = urlsplit(endpoint)
            # Hosts are compared without ports: MSAL drops the port when it builds this query.
            if (parts.hostname or "").lower() != (request.url.hostname or "").lower():
                return self.error_json(
                    request, ProtocolError("invalid_instance", 50049, "Unknown or invalid instance.")
                )
            segments = [s for s in parts.path.split("/") if s]
            tenant = segments[0] if segments else "common"
            tenant_path = f"{tenant}/v2.0" if "v2.0" in segments else tenant
        return JSONResponse(
            {
                "tenant_discovery_endpoint": f"https://{host}/{tenant_path}/.well-known/openid-configuration",
                "api-version": request.query_params.get("api-version", "1.1"),
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
            }
        )

    # -- token endpoint ----------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        authority = self.authority(request)
        if authority is None:
            return self.error_json(request, tenant_not_found(request.path_params["tenant"]))
        fields = _form_fields(await request.form())
        injected = self.directory.take_failure("token")
        if isinstance(injected, InjectedDelay):
            # Asleep without blocking the event loop: the sandbox keeps answering everyone else.
            await asyncio.sleep(injected.seconds)
        elif isinstance(injected, InjectedAnswer):
            return injected.response()
        token_request = TokenRequest(
            directory=self.directory,
            authority=authority,
            base_url=self.base_url(request),
            fields=fields,
            authorization_header=request.headers.get("authorization"),
            client_ip=request.client.host if request.client else "127.0.0.1",
        )
        try:
            if isinstance(injected, InjectedFailure):
                raise injected.as_error()
            body = handle_token_request(token_request)
        except ProtocolError as exc:
            response = self.error_json(request, exc)
            if isinstance(injected, InjectedFailure) and injected.retry_after is not None:
                response.headers["Retry-After"] = str(injected.retry_after)
            return response
        correlation = self.diagnostics(request).correlation_id
        return JSONResponse(body, headers={"client-request-id": correlation} | NO_STORE)

    async def introspect(self, request: Request) -> Response:
        token = _form_fields(await request.form()).get("token", "")
        return JSONResponse(introspect(self.directory, token), headers=NO_STORE)

    # -- authorize endpoint and sign-in pages ------------------------------------------------

    async def authorize(self, request: Request) -> Response:
        injected = self.directory.take_failure("authorize")
        assert injected is None or isinstance(injected, InjectedFailure)  # fail_next queues only these here
        try:
            if injected is not None and injected.aadsts in PAGE_ERROR_CODES:
                raise injected.as_error()
            authority, app, target = self._reply_target(request)
        except ProtocolError as exc:
            return self.error_page(request, exc)
        try:
            if injected is not None:
                raise injected.as_error()
            pending = self._pending_sign_in(request, authority, app)
            if pending.prompt == "none":
                return self._silent_sign_in(request, pending)
        except PageError as exc:
            return self.error_page(request, exc)
        except ProtocolError as exc:
            return self.reply_error(request, target, exc)
        self.directory.start_sign_in(pending)
        return self._account_picker(pending)

    def _reply_target(self, request: Request) -> tuple[Authority, RegisteredApp, ReplyTarget]:
        """Validate what decides whether the app may be answered at all; failures become pages,
        because redirecting to an unverified URI would hand codes and errors to a stranger."""
        params = request.query_params
        authority = self.authority(request)
        if authority is None:
            raise tenant_not_found(request.path_params["tenant"], page=True)
        client_id = params.get("client_id")
        if not client_id:
            raise PageError(
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
            )
        app = self.directory.apps.get(client_id)
        if app is None:
            raise app_not_found(client_id, authority, page=True)
        check_app_for_authority(app, authority, page=True)
        redirect_uri = params.get("redirect_uri")
        if not redirect_uri:
            raise PageError("invalid_request", 900971, "No reply address provided.")
        if redirect_uri not in app.redirect_uris:
            raise PageError(
                "invalid_request",
                50011,
                f"The redirect URI '{redirect_uri}' specified in the request does not match the redirect "
                f"URIs configured for the application '{client_id}'. Make sure the redirect URI sent in the "
                "request "
                "matches one added to your application in the Azure portal. Navigate to "
                "https://aka.ms/redirectUriMismatchError to learn more about how to fix this.",
            )
        mode = params.get("response_mode", "query")
        response_mode: ResponseMode = mode if mode in get_args(ResponseMode) else "query"  # type: ignore[assignment]
        return authority, app, ReplyTarget(redirect_uri, response_mode, params.get("state"))

    def _pending_sign_in(self, request: Request, authority: Authority, app: RegisteredApp) -> PendingSignIn:
        params = request.query_params
        response_type = params.get("response_type")
        if not response_type:
            raise missing_parameter("response_type")
        if response_type != "code":
            raise ProtocolError(
                "unsupported_response_type",
                700054,
                f"response_type '{response_type}' is not enabled for the application.",
            )
        if params.get("response_mode", "query") not in get_args(ResponseMode):
            raise ProtocolError(
                "invalid_request", 70007, f"The response_mode '{params['response_mode']}' is not supported."
            )
        scopes = parse_scopes(params.get("scope") or "")
        challenge, method = params.get("code_challenge"), params.get("code_challenge_method")
        _check_pkce_parameters(challenge, method)
        prompt = params.get("prompt")
        if prompt not in (None, "login", "none", "consent", "select_account"):
            raise ProtocolError(
                "invalid_request", 90023, f"Invalid value '{prompt}' for the 'prompt' parameter."
            )
        return PendingSignIn(
            flow_id=secrets.token_urlsafe(32),
            authority=authority,
            client_id=app.client_id,
            redirect_uri=params["redirect_uri"],
            response_mode=params.get("response_mode", "query"),  # type: ignore[arg-type]
            state=params.get("state"),
            scopes=scopes,
            nonce=params.get("nonce"),
            code_challenge=challenge,
            code_challenge_method=method,
            login_hint=params.get("login_hint"),
            domain_hint=params.get("domain_hint"),
            prompt=prompt,
            wants_client_info=params.get("client_info") == "1",
            created_at=self.directory.now(),
        )

    def _silent_sign_in(self, request: Request, pending: PendingSignIn) -> Response:
        session_id = request.cookies.get(SESSION_COOKIE, "")
        user = self.directory.users.get(self.directory.sessions.get(session_id, ""))
        if user is None or not self._may_sign_in(user, pending.authority):
            raise ProtocolError(
                "login_required", 50058, "A silent sign-in request was sent but no user is signed in."
            )
        if self._consent_missing(pending, user):
            raise ProtocolError(
                "interaction_required",
                65001,
                f"The user or administrator has not consented to use the application with ID "
                f"'{pending.client_id}'. Send an interactive authorization request for this user and "
                "resource.",
            )
        return self._complete(pending, user, session_id)

    def _account_picker(self, pending: PendingSignIn, *, problem: str | None = None) -> HTMLResponse:
        app = self.directory.apps[pending.client_id]
        hint = (pending.login_hint or "").lower()
        users = sorted(self._candidates(pending), key=lambda u: (u.upn != hint, u.display_name))
        return self.page(
            "signin.html",
            # The account and consent forms end in a redirect to the app: Chromium applies
            # form-action to that redirect too, so the app's origin must be allowed.
            form_target=pending.redirect_uri,
            title="Pick an account",
            app=app,
            authority=pending.authority,
            users=users,
            login_hint=hint,
            flow_id=pending.flow_id,
            problem=problem,
            tenants=self.directory.tenants,
        )

    def _candidates(self, pending: PendingSignIn) -> list[SandboxUser]:
        authority, users = pending.authority, list(self.directory.users.values())
        if authority.kind == "tenant":
            return [u for u in users if u.tenant_id == authority.tenant_id]
        if authority.kind == "consumers":
            return []  # the sandbox has work accounts only
        hinted = self.directory.resolve_authority(pending.domain_hint or "")
        if hinted is not None and hinted.tenant is not None:
            return [u for u in users if u.tenant_id == hinted.tenant_id]
        return users

    @staticmethod
    def _may_sign_in(user: SandboxUser, authority: Authority) -> bool:
        if authority.kind == "tenant":
            return user.tenant_id == authority.tenant_id
        return authority.kind != "consumers"

    def _consent_missing(self, pending: PendingSignIn, user: SandboxUser) -> list[str]:
        wanted = pending.scopes.consent_names()
        for item in pending.scopes.resource_scopes:
            if item.permission == ".default":  # the sandbox treats every known permission as configured
                wanted |= {f"{item.resource.identifier}/{name}" for name in item.resource.delegated}
        if pending.prompt == "consent":
            return sorted(wanted)
        return sorted(wanted - self.directory.consented(user, pending.client_id))

    async def sign_in(self, request: Request) -> Response:
        fields = _form_fields(await request.form())
        pending = self.directory.find_pending(fields.get("flow", ""))
        if pending is None:
            return self._expired_page(request)
        user = self.directory.find_user(fields.get("login", "").strip())
        if user is None:
            return self._account_picker(
                pending,
                problem=f"AADSTS50034: The user account {fields.get('login', '')} does not exist in the "
                f"'{pending.authority.label}' directory. To sign into this application, the account must be "
                "added to the directory.",
            )
        app = self.directory.apps[pending.client_id]
        try:
            self._check_user(user, app, pending)
        except ProtocolError as exc:
            return self.error_page(request, exc)
        pending.user_oid = user.oid
        session_id = self.directory.open_session(user.oid)
        missing = self._consent_missing(pending, user)
        response = (
            self._consent_page(pending, user, app, missing)
            if missing
            else self._complete(pending, user, session_id)
        )
        response.set_cookie(SESSION_COOKIE, session_id, secure=True, httponly=True, samesite="lax")
        return response

    def _check_user(self, user: SandboxUser, app: RegisteredApp, pending: PendingSignIn) -> None:
        if pending.authority.kind == "consumers":
            raise PageError(
                "invalid_request", 500208, "The domain is not a valid login domain for the account type."
            )
        if not self._may_sign_in(user, pending.authority):
            raise user_not_in_tenant(user, app, pending.authority, page=True)
        tenant = self.directory.tenants[user.tenant_id]
        consent_blocked = not tenant.users_can_consent and not self.directory.has_admin_consent(
            tenant.tenant_id, app.client_id
        )
        if consent_blocked and self._consent_missing(pending, user):
            raise PageError(
                "consent_required",
                90094,
                f"An administrator of {tenant.display_name} has set a policy that prevents you from granting "
                f"{app.display_name} the permissions it is requesting. Contact an administrator of "
                f"{tenant.display_name}, who can grant permissions to this app on your behalf.",
            )

    def _consent_page(
        self, pending: PendingSignIn, user: SandboxUser, app: RegisteredApp, missing: list[str]
    ) -> HTMLResponse:
        return self.page(
            "consent.html",
            form_target=pending.redirect_uri,
            title="Permissions requested",
            app=app,
            user=user,
            publisher=self.directory.tenants[app.home_tenant_id],
            permissions=[_describe_permission(name) for name in missing],
            flow_id=pending.flow_id,
            authority=pending.authority,
        )

    async def consent(self, request: Request) -> Response:
        fields = _form_fields(await request.form())
        pending = self.directory.find_pending(fields.get("flow", ""))
        user = self.directory.users.get(pending.user_oid or "") if pending else None
        if pending is None or user is None:
            return self._expired_page(request)
        target = ReplyTarget(pending.redirect_uri, pending.response_mode, pending.state)
        if fields.get("decision") != "accept":
            self.directory.finish_sign_in(pending.flow_id)
            declined = ProtocolError("access_denied", 65004, "User declined to consent to access the app.")
            return self.reply_error(request, target, declined)
        self.directory.grant_consent(user.oid, pending.client_id, self._consent_missing(pending, user))
        session_id = request.cookies.get(SESSION_COOKIE) or self.directory.open_session(user.oid)
        return self._complete(pending, user, session_id)

    def _complete(self, pending: PendingSignIn, user: SandboxUser, session_id: str) -> Response:
        issued = self.directory.issue_code(pending, user, session_id)
        self.directory.finish_sign_in(pending.flow_id)
        params = {"code": issued.code}
        # client_info is only returned when the app asked for it (MSAL sends client_info=1).
        if pending.wants_client_info:
            params["client_info"] = _client_info(user)
        params["session_state"] = str(uuid.uuid5(uuid.NAMESPACE_OID, session_id))
        target = ReplyTarget(pending.redirect_uri, pending.response_mode, pending.state)
        return self.reply(target, params, session_id=session_id)

    def _expired_page(self, request: Request) -> HTMLResponse:
        return self.error_page(
            request,
            ProtocolError(
                "invalid_request",
                50089,
                "Authentication failed due to flow token expired. Go back to the application and sign in "
                "again.",
            ),
        )

    # -- admin consent -----------------------------------------------------------------------

    async def admin_consent(self, request: Request) -> Response:
        try:
            authority, app, target = self._reply_target(request)
            scope = request.query_params.get("scope")
            scopes = parse_scopes(scope) if scope else ScopeRequest("", (), frozenset())
        except PageError as exc:
            return self.error_page(request, exc)
        except ProtocolError as exc:
            return self.reply_error(request, target, exc, admin_consent="True")
        pending = PendingSignIn(
            flow_id=secrets.token_urlsafe(32),
            authority=authority,
            client_id=app.client_id,
            redirect_uri=target.redirect_uri,
            response_mode="query",
            state=target.state,
            scopes=scopes,
            nonce=None,
            code_challenge=None,
            code_challenge_method=None,
            login_hint=request.query_params.get("login_hint"),
            domain_hint=None,
            prompt=None,
            wants_client_info=False,
            created_at=self.directory.now(),
            admin_consent_scope=scope or "",
        )
        self.directory.start_sign_in(pending)
        admins = [user for user in self._candidates(pending) if user.is_admin]
        return self.page(
            "adminconsent.html",
            form_target=pending.redirect_uri,
            title="Permissions requested for your organization",
            app=app,
            admins=admins,
            permissions=[_describe_permission(name) for name in sorted(scopes.consent_names())],
            flow_id=pending.flow_id,
            authority=authority,
            tenants=self.directory.tenants,
        )

    async def admin_consent_decision(self, request: Request) -> Response:
        fields = _form_fields(await request.form())
        pending = self.directory.find_pending(fields.get("flow", ""))
        if pending is None or pending.admin_consent_scope is None:
            return self._expired_page(request)
        self.directory.finish_sign_in(pending.flow_id)
        target = ReplyTarget(pending.redirect_uri, "query", pending.state)
        if fields.get("decision") != "accept":
            declined = ProtocolError(
                "consent_required", 65004, "The resource owner or authorization server denied the request."
            )
            return self.reply_error(request, target, declined, admin_consent="True")
        admin = self.directory.find_user(fields.get("login", ""))
        if admin is None or not admin.is_admin or not self._may_sign_in(admin, pending.authority):
            return self.error_page(
                request,
                PageError(
                    "access_denied",
                    90093,
                    "Only an administrator of the tenant can grant consent for the organization.",
                ),
            )
        self.directory.grant_admin_consent(admin.tenant_id, pending.client_id)
        params = {"admin_consent": "True", "tenant": admin.tenant_id}
        if pending.admin_consent_scope:
            params["scope"] = pending.admin_consent_scope
        return self.reply(target, params)

    # -- sign-out, error lookup, stylesheet ----------------------------------------------------

    async def logout(self, request: Request) -> Response:
        session_id = request.cookies.get(SESSION_COOKIE, "")
        with self.directory.lock:
            self.directory.sessions.pop(session_id, None)
        target = request.query_params.get("post_logout_redirect_uri", "")
        registered = any(target in app.redirect_uris for app in self.directory.apps.values())
        response: Response = (
            RedirectResponse(target, status_code=302)
            if target and registered
            else self.page(
                "message.html",
                title="Signed out",
                heading="You signed out of your account",
                text="You can close this window.",
            )
        )
        response.delete_cookie(SESSION_COOKIE, secure=True, httponly=True, samesite="lax")
        return response

    async def error_lookup(self, request: Request) -> Response:
        code = request.query_params.get("code", "")
        return self.page(
            "message.html",
            title=f"AADSTS{code}",
            heading=f"Error AADSTS{code}" if code.isdigit() else "Error lookup",
            text="This sandbox imitates Microsoft's error codes. Look the number up in Microsoft's "
            "documentation of AADSTS error codes for what it means and how to fix it.",
        )

    async def stylesheet(self, request: Request) -> Response:
        css = (TEMPLATES_DIR / "sandbox.css").read_text(encoding="utf-8")
        return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    # -- control API for tests and the demo (JSON) ---------------------------------------------

    async def control_register_app(self, request: Request) -> Response:
        body = await _json_object(request)
        try:
            app = self.directory.register_app(
                display_name=str(body.get("display_name", "Postdesk")),
                redirect_uris=[str(uri) for uri in body.get("redirect_uris", [])],
                sign_in_audience=body.get("sign_in_audience", "AzureADMyOrg"),
                home_tenant_id=str(body.get("home_tenant_id", CONTOSO_TENANT_ID)),
                certificates=[str(pem) for pem in body.get("certificates", [])],
                application_permissions=[str(p) for p in body.get("application_permissions", [])],
            )
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        secret = app.client_secrets[0]
        return JSONResponse(
            {
                "client_id": app.client_id,
                "tenant_id": app.home_tenant_id,
                "display_name": app.display_name,
                "sign_in_audience": app.sign_in_audience,
                "redirect_uris": app.redirect_uris,
                "client_secret": secret.value,
                "client_secret_id": secret.secret_id,
                "client_secret_expires_at": secret.expires_at.isoformat(),
                "certificate_thumbprints": [c.thumbprint for c in app.certificates],
            },
            status_code=201,
            headers=NO_STORE,
        )

    async def control_fail_next(self, request: Request) -> Response:
        body = await _json_object(request)
        aadsts = body.get("aadsts")
        try:
            self.directory.fail_next(
                body.get("endpoint", ""),
                error=str(body["error"]),
                aadsts=int(aadsts) if aadsts is not None else None,
                description=str(body.get("description", "")),
                status=int(body.get("status", 400)),
                retry_after=_optional_int(body.get("retry_after")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse({"error": f"invalid request: {exc}"}, status_code=400)
        return JSONResponse({"queued": True}, status_code=202)

    async def control_answer_next(self, request: Request) -> Response:
        body = await _json_object(request)
        try:
            self.directory.answer_next(
                "token",
                status=int(body["status"]),
                body=str(body.get("body", "")),
                content_type=str(body.get("content_type", "text/html; charset=utf-8")),
                retry_after=_optional_int(body.get("retry_after")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse({"error": f"invalid request: {exc}"}, status_code=400)
        return JSONResponse({"queued": True}, status_code=202)

    async def control_delay_next(self, request: Request) -> Response:
        body = await _json_object(request)
        try:
            self.directory.delay_next("token", float(body["seconds"]))
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse({"error": f"invalid request: {exc}"}, status_code=400)
        return JSONResponse({"queued": True}, status_code=202)

    async def control_revoke(self, request: Request) -> Response:
        try:
            affected = self.directory.revoke_refresh_tokens(request.path_params["user"])
        except KeyError:
            return JSONResponse({"error": "no such user"}, status_code=404)
        return JSONResponse(
            {"refresh_tokens_revoked": affected, "tokens_valid_from": self.directory.now().isoformat()}
        )

    async def control_clock(self, request: Request) -> Response:
        if request.method == "POST":
            body = await _json_object(request)
            try:
                offset = timedelta(seconds=float(body["offset_seconds"]))
            except (KeyError, ValueError, TypeError):
                return JSONResponse({"error": "offset_seconds (a number) is required"}, status_code=400)
            with self.directory.lock:
                self.directory.clock_offset = offset
        return JSONResponse(
            {
                "now": self.directory.now().isoformat(),
                "offset_seconds": self.directory.clock_offset.total_seconds(),
            }
        )

    async def control_users(self, request: Request) -> Response:
        return JSONResponse(
            {
                "tenants": [
                    {"tenant_id": t.tenant_id, "domain": t.domain, "display_name": t.display_name}
                    for t in self.directory.tenants.values()
                ],
                "users": [
                    {
                        "oid": u.oid,
                        "tenant_id": u.tenant_id,
                        "upn": u.upn,
                        "display_name": u.display_name,
                        "is_admin": u.is_admin,
                    }
                    for u in self.directory.users.values()
                ],
            }
        )

    def routes(self) -> list[Route]:
        control = [
            Route("/_sandbox/apps", self.control_register_app, methods=["POST"]),
            Route("/_sandbox/fail-next", self.control_fail_next, methods=["POST"]),
            Route("/_sandbox/answer-next", self.control_answer_next, methods=["POST"]),
            Route("/_sandbox/delay-next", self.control_delay_next, methods=["POST"]),
            Route("/_sandbox/users", self.control_users, methods=["GET"]),
            Route("/_sandbox/users/{user}/revoke-sign-in-sessions", self.control_revoke, methods=["POST"]),
            Route("/_sandbox/clock", self.control_clock, methods=["GET", "POST"]),
            Route("/_sandbox/introspect", self.introspect, methods=["POST"]),
            Route("/_sandbox/static/sandbox.css", self.stylesheet, methods=["GET"]),
        ]
        protocol = [
            Route("/error", self.error_lookup, methods=["GET"]),
            Route("/common/discovery/instance", self.instance_discovery, methods=["GET"]),
            Route(
                "/{tenant}/v2.0/.well-known/openid-configuration", self.openid_configuration, methods=["GET"]
            ),
            Route("/{tenant}/discovery/v2.0/keys", self.keys, methods=["GET"]),
            Route("/{tenant}/discovery/keys", self.keys, methods=["GET"]),
            Route("/{tenant}/oauth2/v2.0/authorize", self.authorize, methods=["GET"]),
            Route("/{tenant}/oauth2/v2.0/token", self.token, methods=["POST"]),
            Route("/{tenant}/oauth2/v2.0/logout", self.logout, methods=["GET"]),
            Route("/{tenant}/login", self.sign_in, methods=["POST"]),
            Route("/{tenant}/consent", self.consent, methods=["POST"]),
            Route("/{tenant}/adminconsent", self.admin_consent, methods=["GET"]),
            Route("/{tenant}/v2.0/adminconsent", self.admin_consent, methods=["GET"]),
            Route("/{tenant}/adminconsent/decision", self.admin_consent_decision, methods=["POST"]),
        ]
        return control + protocol


def _check_pkce_parameters(challenge: str | None, method: str | None) -> None:
    if method and not challenge:
        raise missing_parameter("code_challenge")
    if method and method not in ("S256", "plain"):
        raise ProtocolError(
            "invalid_request",
            9002313,
            f"Invalid request. The code_challenge_method '{method}' is not supported.",
        )
    if challenge and not 43 <= len(challenge) <= 128:
        raise ProtocolError("invalid_request", 501491, "Invalid size of Code_Challenge parameter.")


def _describe_permission(name: str) -> dict[str, str]:
    """Human words for a scope on the consent pages, with the technical name beside them."""
    if name in OIDC_SCOPES:
        return {"name": name, "description": OIDC_SCOPES[name], "resource": "OpenID Connect"}
    prefix, _, permission = name.rpartition("/")
    resource = next((r for r in RESOURCES if r.names(prefix)), GRAPH)
    description = resource.delegated.get(permission, permission)
    return {"name": permission, "description": description, "resource": resource.display_name}


def _optional_int(value: object) -> int | None:
    return None if value is None else int(str(value))


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def mail_routes(directory: SandboxDirectory, platform: IdentityPlatform) -> list[Route]:
    """``/_sandbox/mail``: write a customer's email into a sandbox mailbox, for trying Postdesk offline."""
    page = MailPage(directory, platform.page)
    return [
        Route("/_sandbox/mail", page.form, methods=["GET"]),
        Route("/_sandbox/mail", page.send, methods=["POST"]),
    ]


def create_app(directory: SandboxDirectory) -> Starlette:
    """The ASGI app serving ``directory`` as a Microsoft identity platform look-alike."""
    platform = IdentityPlatform(directory)
    app = Starlette(routes=[*platform.routes(), *mail_routes(directory, platform)])
    app.state.directory = directory
    return app
