"""The "Connect Microsoft 365 App" form: what an admin enters, and the mistakes caught before Microsoft.

Most first-time AADSTS errors come from a value copied from the wrong place in the Entra admin center:
the Secret ID instead of the secret Value, the tenant ID in the client ID box, 'common' for a
single-tenant app. `validate_app_registration` catches those while the admin is still on the form,
and says where to find the right value. Pure code: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

AccountTypes = Literal["single", "multi", "multi_personal"]
Severity = Literal["error", "warning"]

SUPPORTED_CLOUDS = ("global", "usgov", "china")
CALLBACK_PATH = "/auth/microsoft365/callback"
CONSENT_SCOPES = (
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
    "openid",
    "profile",
    "email",
)

_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
_DOMAIN = re.compile(r"^(?=.{4,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,62}$")
_SHARED_TENANTS = ("common", "organizations")
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Secret Values the portal generates are about 40 characters; a much shorter one was cut off.
_SHORTEST_PLAUSIBLE_SECRET = 30


@dataclass(frozen=True)
class FormProblem:
    field: str
    message: str
    severity: Severity


class DelegatedPermission(NamedTuple):
    name: str
    api: str
    purpose: str


class AccountTypeChoice(NamedTuple):
    key: AccountTypes
    portal_label: str
    explanation: str


# In the portal all six are under API permissions → Add a permission → Microsoft Graph → Delegated
# permissions, although Postdesk requests IMAP and SMTP for the Outlook resource.
REQUIRED_DELEGATED_PERMISSIONS: tuple[DelegatedPermission, ...] = (
    DelegatedPermission(
        "openid", "Microsoft Graph", "Lets the person sign in, so Postdesk knows which account connected."
    ),
    DelegatedPermission(
        "email", "Microsoft Graph", "Lets Postdesk see the signed-in account's email address."
    ),
    DelegatedPermission(
        "profile", "Microsoft Graph", "Lets Postdesk see the account's name and tenant to label the channel."
    ),
    DelegatedPermission(
        "offline_access",
        "Microsoft Graph",
        "Lets Postdesk keep a refresh token, so it can fetch mail without anyone signing in every hour.",
    ),
    DelegatedPermission(
        "IMAP.AccessAsUser.All",
        "Microsoft Graph",
        "Lets Postdesk read the mailbox over IMAP as the signed-in account.",
    ),
    DelegatedPermission(
        "SMTP.Send",
        "Microsoft Graph",
        "Lets Postdesk send agents' replies from the mailbox over SMTP.",
    ),
)

ACCOUNT_TYPES: tuple[AccountTypeChoice, ...] = (
    AccountTypeChoice(
        "single",
        "Accounts in this organizational directory only (<your organization> only - Single tenant)",
        "Only mailboxes of your own organization can connect; the usual choice for an in-house help desk.",
    ),
    AccountTypeChoice(
        "multi",
        "Accounts in any organizational directory (Any Microsoft Entra ID tenant - Multitenant)",
        "Work mailboxes of any organization can connect, after that organization approves the app.",
    ),
    AccountTypeChoice(
        "multi_personal",
        "Accounts in any organizational directory (Any Microsoft Entra ID tenant - Multitenant) and "
        "personal Microsoft accounts (e.g. Skype, Xbox)",
        "Like multitenant, and personal Outlook.com accounts can sign in too; Postdesk is not built for "
        "them.",
    ),
)
UNSUPPORTED_ACCOUNT_TYPE = (
    "“Personal Microsoft accounts only” is not supported: Postdesk connects Microsoft 365 work mailboxes."
)


def validate_app_registration(
    *,
    client_id: str,
    tenant: str,
    client_secret: str | None,
    has_certificate: bool,
    cloud: str,
    base_url: str,
    account_types: AccountTypes,
) -> list[FormProblem]:
    """Every problem found in the form, errors and warnings, in the order of the form's fields."""
    return [
        *_client_id_problems(client_id, tenant=normalise_tenant(tenant)),
        *_tenant_problems(tenant, account_types=account_types),
        *_secret_problems(client_secret, has_certificate=has_certificate),
        *_cloud_problems(cloud),
        *_base_url_problems(base_url),
        *_account_type_problems(account_types),
    ]


def normalise_tenant(value: str) -> str:
    """The tenant as Microsoft expects it: trimmed, lowercase, taken out of a pasted login URL."""
    tenant = value.strip()
    if "://" in tenant or tenant.lower().startswith("login."):
        tenant = _tenant_from_url(tenant)
    return tenant.strip().strip("/").rstrip(".").lower()


def redirect_uri_for(base_url: str) -> str:
    """The redirect URI to register under the Web platform for this Postdesk address."""
    return base_url.strip().rstrip("/") + CALLBACK_PATH


def admin_consent_url(
    *,
    login_url: str,
    tenant: str,
    client_id: str,
    redirect_uri: str,
    state: str,
    scopes: Sequence[str] = CONSENT_SCOPES,
) -> str:
    """Microsoft's v2.0 admin consent link, where an administrator approves Postdesk for everyone.

    Microsoft documents that 'common' must not be used here (a personal account cannot consent for an
    organization), so it becomes 'organizations'. For US Government or China pass that cloud's Outlook
    scopes.
    """
    tenant = normalise_tenant(tenant) or "organizations"
    if tenant == "common":
        tenant = "organizations"
    query = urlencode(
        {
            "client_id": client_id.strip(),
            "scope": " ".join(scopes),
            "redirect_uri": redirect_uri,
            "state": state,
        },
        quote_via=quote,
    )
    return f"{login_url.rstrip('/')}/{quote(tenant, safe='')}/v2.0/adminconsent?{query}"


# --- field checks ----------------------------------------------------------------------------------


def _is_guid(value: str) -> bool:
    return bool(_GUID.match(value))


def _client_id_problems(client_id: str, *, tenant: str) -> list[FormProblem]:
    value = client_id.strip()
    if not value:
        return [_error("client_id", _CLIENT_ID_HELP)]
    if not _is_guid(value):
        return [_error("client_id", f"This is not a client ID. {_CLIENT_ID_HELP}")]
    if value.lower() == tenant:
        return [
            _error(
                "client_id",
                "The client ID is the same as the tenant ID, so the Directory (tenant) ID was pasted into "
                "both boxes. Copy the Application (client) ID from the app's Overview page.",
            )
        ]
    return []


_CLIENT_ID_HELP = (
    "The Application (client) ID is a GUID like 1b7e4c2a-8f3d-4e6b-9a01-5c2d7e8f9a0b; copy it from the "
    "app's Overview page in the Entra admin center (App registrations → your app). The Object ID on the "
    "same page is a different value."
)


def _tenant_problems(raw_tenant: str, *, account_types: AccountTypes) -> list[FormProblem]:
    tenant = normalise_tenant(raw_tenant)
    if not tenant:
        return [_error("tenant", _empty_tenant_message(account_types))]
    if tenant == "consumers":
        return [_error("tenant", f"{UNSUPPORTED_ACCOUNT_TYPE} {_TENANT_HELP}")]
    if tenant in _SHARED_TENANTS:
        return _shared_tenant_problems(tenant, account_types=account_types)
    if "@" in tenant:
        domain = tenant.rsplit("@", 1)[1]
        return [_error("tenant", f"Enter the domain only ({domain}), not an email address.")]
    if not (_is_guid(tenant) or _DOMAIN.match(tenant)):
        return [_error("tenant", f"“{tenant}” is not a tenant. {_TENANT_HELP}")]
    return []


_TENANT_HELP = (
    "Enter the Directory (tenant) ID (a GUID on the app's Overview page) or your domain, such as "
    "contoso.onmicrosoft.com or contoso.com."
)


def _empty_tenant_message(account_types: AccountTypes) -> str:
    if account_types == "single":
        return (
            "Enter your tenant. A single-tenant app cannot use the shared 'common' address: Microsoft "
            f"refuses the sign-in with AADSTS50194. {_TENANT_HELP}"
        )
    return f"{_TENANT_HELP} To let work accounts of any organization connect, enter 'organizations'."


def _shared_tenant_problems(tenant: str, *, account_types: AccountTypes) -> list[FormProblem]:
    if account_types == "single":
        return [
            _error(
                "tenant",
                f"'{tenant}' works only for multitenant apps. This app is single-tenant, so Microsoft "
                f"would refuse the sign-in with AADSTS50194. {_TENANT_HELP}",
            )
        ]
    if tenant == "common" and account_types == "multi":
        return [
            _warning(
                "tenant",
                "'common' also offers the sign-in to personal Microsoft accounts, which this app does "
                "not accept. Enter 'organizations' so only work accounts are offered.",
            )
        ]
    return []


def _secret_problems(client_secret: str | None, *, has_certificate: bool) -> list[FormProblem]:
    raw = client_secret or ""
    secret = raw.strip()
    if not secret:
        if has_certificate:
            return []
        return [
            _error(
                "client_secret",
                "Enter the client secret Value, or upload a certificate. Create a secret in the Entra "
                "admin center under App registrations → your app → Certificates & secrets → New client "
                "secret.",
            )
        ]
    problems: list[FormProblem] = []
    if secret != raw:
        problems.append(
            _warning(
                "client_secret",
                "The secret had spaces or line breaks around it; Postdesk removes them. Check that the "
                "whole Value was copied.",
            )
        )
    problems.extend(_secret_value_problems(secret))
    return problems


def _secret_value_problems(secret: str) -> list[FormProblem]:
    if _is_guid(secret):
        return [
            _error(
                "client_secret",
                "You pasted the Secret ID; paste the secret Value instead. The Value is shown only once, "
                "right after you create the secret; if you no longer have it, create a new secret under "
                "Certificates & secrets → New client secret.",
            )
        ]
    if len(secret) < _SHORTEST_PLAUSIBLE_SECRET:
        return [
            _warning(
                "client_secret",
                f"This secret has only {len(secret)} characters; the Values Microsoft generates have about "
                "40. Check that the whole Value was copied.",
            )
        ]
    return []


def _cloud_problems(cloud: str) -> list[FormProblem]:
    if cloud.strip().lower() in SUPPORTED_CLOUDS:
        return []
    return [
        _error(
            "cloud",
            "Choose 'global' (Microsoft 365 worldwide, including GCC), 'usgov' (GCC High) or 'china' "
            "(operated by 21Vianet).",
        )
    ]


def _base_url_problems(base_url: str) -> list[FormProblem]:
    try:
        parts = urlsplit(base_url.strip())
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [
            _error(
                "base_url",
                "Enter the full address people use to open Postdesk, such as https://helpdesk.example.com.",
            )
        ]
    if parts.fragment:
        return [
            _error("base_url", "Remove the part after “#”: Microsoft does not accept it in a redirect URI.")
        ]
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        return [
            _warning(
                "base_url",
                "Use https. Microsoft accepts http redirect URIs only for localhost, so the sign-in will "
                "fail (AADSTS50011), and sign-in codes would cross the network unencrypted.",
            )
        ]
    return []


def parse_account_types(value: str) -> AccountTypes | None:
    """The form's or command line's account-types value, or None when it is not one of ours."""
    for choice in ACCOUNT_TYPES:
        if choice.key == value:
            return choice.key
    return None


def _account_type_problems(account_types: AccountTypes) -> list[FormProblem]:
    if account_types != "multi_personal":
        return []
    return [
        _warning(
            "account_types",
            "Personal Microsoft accounts (Outlook.com, Hotmail) will be able to sign in. Microsoft allows "
            "IMAP and SMTP for them, but Postdesk is built for Microsoft 365 help-desk mailboxes: shared "
            "mailboxes, admin consent and tenant policies do not exist for personal accounts. Choose "
            "“Accounts in any organizational directory” unless you need them.",
        )
    ]


def _tenant_from_url(value: str) -> str:
    """The tenant segment of a pasted URL such as https://login.microsoftonline.com/<tenant>/oauth2/..."""
    url = value if "://" in value else f"https://{value}"
    try:
        path = urlsplit(url).path
    except ValueError:  # e.g. a broken IPv6 literal; the tenant check then reports the value
        return value
    segments = [segment for segment in path.split("/") if segment]
    return segments[0] if segments else ""


def _error(field: str, message: str) -> FormProblem:
    return FormProblem(field, message, "error")


def _warning(field: str, message: str) -> FormProblem:
    return FormProblem(field, message, "warning")
