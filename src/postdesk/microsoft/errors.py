"""Microsoft identity platform errors, explained to the admin who has to fix them.

Microsoft answers a failed sign-in or token call with an OAuth `error` string and, in the
`error_description`, an AADSTS number ("AADSTS50011: ..."). The numbers are what identify the real
cause, so `explain` looks at the number first, then at the OAuth error, then falls back to a generic
message that still carries the number and the IDs Microsoft support asks for.

Each explanation also says whether retrying can help (`transient`) and what a mail channel's status
should become when the error happens while refreshing its token. Pure code: no I/O.

Meanings follow Microsoft's "Microsoft Entra authentication and authorization error codes" reference;
Microsoft warns that codes and texts change, so unknown codes are expected and handled.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

ChannelStatus = Literal["ok", "needs_reauth", "error"]

_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})

_AADSTS_IN_TEXT = re.compile(r"AADSTS(\d{1,10})")
_CODE_IN_URI = re.compile(r"[?&]code=(\d{1,10})")
_TRACE_ID = re.compile(r"Trace ID:\s*([0-9A-Za-z-]+)")
_CORRELATION_ID = re.compile(r"Correlation ID:\s*([0-9A-Za-z-]+)")
_TIMESTAMP = re.compile(r"Timestamp:\s*(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:\.\d+)?Z?)")
_MISSING_PARAMETER = re.compile(r"following parameter: '([^']{1,100})'")


class Remedy(enum.StrEnum):
    """Who has to do what for the error to go away."""

    REAUTHENTICATE = "reauthenticate"  # a person signs in to this mailbox again
    FIX_APP_REGISTRATION = "fix_app_registration"  # an admin changes Entra ID or Postdesk's app settings
    ADMIN_CONSENT = "admin_consent"  # an administrator approves Postdesk's permissions
    RETRY = "retry"  # transient: Postdesk retries with backoff
    USER_ACTION = "user_action"  # the person signing in must do something (MFA, policy, cancel)
    CONTACT_SUPPORT = "contact_support"  # report it, with the support reference


@dataclass(frozen=True)
class IdentityError:
    """One error from Microsoft's identity platform, as received."""

    error: str
    aadsts: int | None = None
    description: str = ""
    trace_id: str | None = None
    correlation_id: str | None = None
    timestamp: str | None = None
    error_codes: tuple[int, ...] = ()
    suberror: str | None = None

    @classmethod
    def from_token_response(cls, body: Mapping[str, object]) -> IdentityError:
        """Build from the JSON body of a failed token call, or from MSAL's result dict (same keys)."""
        description = _text(body.get("error_description")) or ""
        codes = _codes(body.get("error_codes"))
        error_uri = _text(body.get("error_uri"))
        return cls(
            error=_text(body.get("error")) or "unknown_error",
            aadsts=_first_code(codes, description, error_uri),
            description=description,
            trace_id=_text(body.get("trace_id")) or _search(_TRACE_ID, description),
            correlation_id=_text(body.get("correlation_id")) or _search(_CORRELATION_ID, description),
            timestamp=_text(body.get("timestamp")) or _search(_TIMESTAMP, description),
            error_codes=codes,
            suberror=_text(body.get("suberror")),
        )

    @classmethod
    def from_redirect(cls, params: Mapping[str, str]) -> IdentityError:
        """Build from the query parameters Microsoft adds to the OAuth callback on failure."""
        description = _text(params.get("error_description")) or ""
        aadsts = _first_code((), description, _text(params.get("error_uri")))
        return cls(
            error=_text(params.get("error")) or "unknown_error",
            aadsts=aadsts,
            description=description,
            trace_id=_search(_TRACE_ID, description),
            correlation_id=_search(_CORRELATION_ID, description),
            timestamp=_search(_TIMESTAMP, description),
            error_codes=(aadsts,) if aadsts is not None else (),
            suberror=_text(params.get("error_subcode")),
        )


@dataclass(frozen=True)
class Explanation:
    """What went wrong and how to fix it, in words for a busy help-desk admin."""

    title: str
    cause: str
    fix: str
    remedy: Remedy
    transient: bool
    channel_status: ChannelStatus


def explain(err: IdentityError, *, context: Mapping[str, str] = _NO_CONTEXT) -> Explanation:
    """Explain `err`; `context` fills placeholders such as redirect_uri, client_id, tenant.

    Other placeholders: admin_consent_url, login_url (for the error lookup page).
    """
    template = _BY_CODE.get(err.aadsts) if err.aadsts is not None else None
    if template is None:
        template = _explain_by_error(err)
    values = _Placeholders({**_automatic_values(err), **context})
    values.setdefault("app", _app_name(context))
    return replace(
        template,
        title=template.title.format_map(values),
        cause=template.cause.format_map(values),
        fix=template.fix.format_map(values),
    )


def is_transient(err: IdentityError) -> bool:
    """True when retrying later, with backoff, can succeed without anyone changing anything."""
    return explain(err).transient


def support_reference(err: IdentityError) -> str:
    """One line with what Microsoft support asks for: code, Trace ID, Correlation ID, time."""
    parts = [f"AADSTS{err.aadsts}" if err.aadsts is not None else err.error]
    if err.trace_id:
        parts.append(f"Trace ID {err.trace_id}")
    if err.correlation_id:
        parts.append(f"Correlation ID {err.correlation_id}")
    if err.timestamp:
        parts.append(err.timestamp)
    return " · ".join(parts)


# --- parsing helpers -------------------------------------------------------------------------------


def _text(value: object) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _codes(value: object) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return ()
    codes: list[int] = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and 0 < item < 10**10:
            codes.append(item)
        elif isinstance(item, str) and item.strip().isdecimal() and len(item.strip()) <= 10:
            codes.append(int(item.strip()))
    return tuple(codes)


def _first_code(codes: tuple[int, ...], description: str, error_uri: str | None) -> int | None:
    if codes:
        return codes[0]
    found = _search(_AADSTS_IN_TEXT, description) or _search(_CODE_IN_URI, error_uri or "")
    return int(found) if found else None


def _search(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    return match.group(1) if match else None


def _summary(description: str) -> str:
    """Microsoft's message without the code prefix and the trace lines."""
    first_line = description.replace("\r", "\n").split("\n", 1)[0]
    return _AADSTS_IN_TEXT.sub("", first_line, count=1).lstrip(": ").strip()[:300]


def _automatic_values(err: IdentityError) -> dict[str, str]:
    code = str(err.aadsts) if err.aadsts is not None else ""
    return {
        "code": f"AADSTS{code}" if code else err.error,
        "code_number": code or err.error,
        "error": err.error,
        "microsoft_message": _summary(err.description) or "(no description)",
        "parameter": _missing_parameter(err.description),
    }


def _app_name(context: Mapping[str, str]) -> str:
    client_id = context.get("client_id")
    return f"the app with client ID {client_id}" if client_id else "your Postdesk app"


def _missing_parameter(description: str) -> str:
    name = _search(_MISSING_PARAMETER, description)
    return f"the parameter '{name}'" if name else "a required parameter"


class _Placeholders(dict[str, str]):
    """Fills a placeholder nobody provided with words that still read well."""

    _DEFAULTS: Mapping[str, str] = MappingProxyType(
        {
            "redirect_uri": "the redirect URI shown in Postdesk under Channels › Microsoft 365 app",
            "tenant": "your organization's tenant",
            "admin_consent_url": "the admin consent link in Postdesk under Channels › Microsoft 365 app",
            "login_url": "https://login.microsoftonline.com",
        }
    )

    def __missing__(self, key: str) -> str:
        return self._DEFAULTS.get(key, "{" + key + "}")


# --- the catalogue ---------------------------------------------------------------------------------
# Placeholders in {braces} are filled by `explain`. Screens: "Entra admin center" is
# entra.microsoft.com; the same blades exist in the Azure portal under Microsoft Entra ID.

_APP_PATH = "App registrations → {app}"
_APP = f"In the Entra admin center open {_APP_PATH}"
_POSTDESK_APP = "Postdesk under Channels › Microsoft 365 app"
_SIGN_IN_AGAIN = (
    "In Postdesk open Channels, choose this mailbox and click “Re-authenticate”, then sign in with the "
    "account that connected it (for a shared mailbox: a user with Full Access to it)."
)
_CHECK_CLOCK = (
    "Check the Postdesk server's clock (for example `timedatectl`) and turn on time synchronisation "
    "(NTP); Microsoft rejects sign-in assertions from a clock that is off by more than a few minutes."
)


def _reauth(title: str, cause: str, fix: str = _SIGN_IN_AGAIN) -> Explanation:
    return Explanation(title, cause, fix, Remedy.REAUTHENTICATE, False, "needs_reauth")


def _app_setup(title: str, cause: str, fix: str) -> Explanation:
    return Explanation(title, cause, fix, Remedy.FIX_APP_REGISTRATION, False, "error")


def _consent(title: str, cause: str, fix: str) -> Explanation:
    return Explanation(title, cause, fix, Remedy.ADMIN_CONSENT, False, "needs_reauth")


def _person(title: str, cause: str, fix: str, status: ChannelStatus = "needs_reauth") -> Explanation:
    return Explanation(title, cause, fix, Remedy.USER_ACTION, False, status)


def _retry(title: str, cause: str, fix: str = "") -> Explanation:
    fix = fix or (
        "Nothing to do: Postdesk retries with a growing delay. If it lasts more than an hour, check "
        "Microsoft 365 service health in the admin center and keep the support reference below."
    )
    return Explanation(title, cause, fix, Remedy.RETRY, True, "ok")


def _report(title: str, cause: str, fix: str) -> Explanation:
    return Explanation(title, cause, fix, Remedy.CONTACT_SUPPORT, False, "error")


_SECRET_WRONG = _app_setup(
    "The client secret is wrong",
    "Microsoft rejected the client secret Postdesk sent. Most often the Secret ID was pasted instead of "
    "the secret Value, or the secret belongs to another app registration.",
    f"{_APP} → Certificates & secrets → New client secret. Copy the Value column right away (Microsoft "
    f"shows it only once) — not the Secret ID — and paste it into {_POSTDESK_APP}. Mailboxes do not need "
    "to sign in again.",
)

_APP_NOT_FOUND = _app_setup(
    "Microsoft cannot find the app in this tenant",
    "There is no app with the client ID Postdesk sent in {tenant}. Usually the client ID was mistyped or the "
    "Object ID was copied instead, the tenant is a different directory from the one holding the app, or "
    "the cloud setting does not match.",
    f"{_APP} → Overview. Copy the Application (client) ID and the Directory (tenant) ID into "
    f"{_POSTDESK_APP}, and check that the cloud (global, US Government or China) matches your tenant.",
)

_TENANT_UNKNOWN = _app_setup(
    "Microsoft could not tell which organization to sign in to",
    "The request went to a shared address ('common' or 'organizations') and Microsoft could not work "
    "out the tenant from it.",
    f"Enter your Directory (tenant) ID — a GUID on the app's Overview page — or your domain in "
    f"{_POSTDESK_APP}, instead of 'common' or 'organizations'.",
)

_RESOURCE_MISSING = _app_setup(
    "The mail service Postdesk asked for is not available in this tenant",
    "Microsoft could not find the service Postdesk requested (Exchange Online, or Microsoft Graph) in "
    "{tenant}. The organization may have no Exchange Online subscription, or Postdesk's cloud setting "
    "points to a different Microsoft cloud from the one the tenant lives in.",
    f"Check that the organization has Microsoft 365 with Exchange Online, and that the cloud in "
    f"{_POSTDESK_APP} matches the tenant (global, US Government or China). Then sign in again.",
)

_APP_DISABLED = _app_setup(
    "The Postdesk app is disabled in this tenant",
    "An admin has turned off sign-ins for the Postdesk app, so Microsoft refuses every request from it.",
    "In the Entra admin center open Enterprise applications → your Postdesk app → Properties, set "
    "“Enabled for users to sign-in?” to Yes and save.",
)

_SERVER_CLOCK = _app_setup(
    "The server's clock looks wrong",
    "Microsoft received a token or signed assertion outside its valid time window. This usually means "
    "the Postdesk server's clock is off; waiting will not fix it.",
    _CHECK_CLOCK,
)

_MFA_NEEDED = _person(
    "Multifactor authentication is needed",
    "A policy in {tenant} now asks for a second factor, which Postdesk cannot provide in the background.",
    "Sign in again from Postdesk (Channels › this mailbox › “Re-authenticate”) and complete the MFA prompt.",
)

_SERVICE_HICCUP = _retry(
    "Microsoft's sign-in service had a temporary problem",
    "Microsoft reported a passing fault on its side ({code}).",
)

_DEVICE_POLICY = _person(
    "A device rule blocked the sign-in",
    "Conditional Access in {tenant} requires a compliant or managed device for this sign-in. Postdesk "
    "refreshes tokens from its server, which is not such a device.",
    "Ask an Entra admin to exclude the Postdesk app from the device requirement (Entra admin center → "
    "Protection → Conditional Access), then sign in again from a device the policy accepts.",
    status="error",
)

_BY_CODE: dict[int, Explanation] = {
    # --- the saved sign-in (refresh token) is gone: someone signs in again ---
    70000: _reauth(
        "The saved sign-in is no longer valid",
        "Microsoft no longer accepts the refresh token Postdesk holds for this mailbox.",
    ),
    70008: _reauth(
        "The mailbox sign-in has expired",
        "The refresh token Postdesk holds for this mailbox expired or was revoked, so Postdesk cannot get "
        "new access without a person signing in.",
    ),
    700082: _reauth(
        "The mailbox sign-in expired after a long pause",
        "Refresh tokens expire when unused for 90 days. Postdesk did not use this one in time, for "
        "example because the channel was disabled or no worker was running.",
        _SIGN_IN_AGAIN + " Keep a worker running so the sign-in stays fresh.",
    ),
    50173: _reauth(
        "The mailbox sign-in was revoked",
        "The account's password was changed, or an admin revoked its sessions, which ends every saved "
        "sign-in for that account.",
    ),
    70043: _reauth(
        "Conditional Access asks for a fresh sign-in",
        "A Conditional Access policy in {tenant} limits how long a sign-in lasts (sign-in frequency), and "
        "that time has passed for this mailbox.",
        _SIGN_IN_AGAIN + " To stop this recurring, an Entra admin can exclude the Postdesk app from the "
        "sign-in frequency policy.",
    ),
    50132: _reauth(
        "The sign-in session ended after a password change",
        "The account's password expired or was changed recently, which invalidates the session.",
    ),
    50133: _reauth(
        "The sign-in session ended after a password change",
        "The account's password expired or was changed recently, which invalidates the session.",
    ),
    700003: _reauth(
        "The device this sign-in was tied to is gone",
        "The sign-in was bound to a device that has since been removed or disabled in Entra ID, so "
        "Microsoft no longer accepts it.",
        _SIGN_IN_AGAIN + " If the device was removed by mistake, an admin can restore it under Entra admin "
        "center → Devices.",
    ),
    54005: _reauth(
        "This sign-in was already completed",
        "The one-time code Microsoft returned was already used, usually because the browser reloaded or "
        "went back to Postdesk's callback page.",
        "Start the connection again from Postdesk's Channels screen and do not reload the page Microsoft "
        "sends you back to.",
    ),
    501481: _reauth(
        "The sign-in came back to a different session",
        "Postdesk could not prove the sign-in it received is the one it started (PKCE mismatch). This "
        "happens with two sign-in tabs open at once, or several Postdesk web servers that do not share "
        "the same POSTDESK_SECRET_KEY.",
        "Close other sign-in tabs and start again from Postdesk's Channels screen. Behind a load "
        "balancer, give every Postdesk instance the same POSTDESK_SECRET_KEY and database.",
    ),
    50058: _reauth(
        "Nobody is signed in to Microsoft",
        "Postdesk tried to sign in without showing a page, and Microsoft has no signed-in session to use.",
    ),
    50089: _reauth(
        "The sign-in took too long",
        "The sign-in page was left open too long and its session expired.",
        "Start the connection again from Postdesk's Channels screen and finish it in one go.",
    ),
    # --- the app registration or Postdesk's app settings need a change ---
    50011: _app_setup(
        "The redirect URI is not registered",
        "Microsoft was asked to send the browser back to an address that is not in the app "
        "registration, or differs in a detail such as http/https, a trailing slash or the host name.",
        f"{_APP} → Authentication. Under the Web platform add exactly {{redirect_uri}} and save. If that "
        "address is not how people reach Postdesk, correct POSTDESK_BASE_URL instead.",
    ),
    500113: _app_setup(
        "No redirect URI is registered for the app",
        "The app registration has no redirect URI at all, so Microsoft has nowhere to send the browser "
        "after sign-in.",
        f"{_APP} → Authentication → Add a platform → Web, enter {{redirect_uri}} and save.",
    ),
    50194: _app_setup(
        "The app is single-tenant, but Postdesk used the shared 'common' address",
        "The app registration accepts accounts from its own directory only, so sign-ins through "
        "'common' are refused.",
        f"Enter the Directory (tenant) ID from the app's Overview page, or your domain (for example "
        f"contoso.com), as tenant in {_POSTDESK_APP}. Only if mailboxes from other organizations must "
        "connect, make the app multitenant under App registrations → your app → Authentication.",
    ),
    700016: _APP_NOT_FOUND,
    700011: _APP_NOT_FOUND,
    7000215: _SECRET_WRONG,
    70002: _SECRET_WRONG,
    7000222: _app_setup(
        "The client secret has expired",
        "Client secrets have an end date and this one has passed, so Postdesk cannot get tokens for any "
        "mailbox until it has a new one.",
        f"{_APP} → Certificates & secrets → New client secret. Copy the Value (shown only once) into "
        f"{_POSTDESK_APP}. Mailboxes do not need to sign in again. Note the new end date and renew "
        "before it; then delete the expired secret.",
    ),
    7000218: _app_setup(
        "Postdesk has no client secret or certificate to send",
        "The app is registered as a Web app, so Microsoft requires a client secret or certificate with "
        "every token request, and none was sent.",
        f"Enter the client secret Value, or upload a certificate, in {_POSTDESK_APP} and save.",
    ),
    700025: _app_setup(
        "The app is registered as a desktop or mobile app",
        "Microsoft treats the app as a public client, which may not send a client secret, but Postdesk is "
        "a server app that must.",
        f"{_APP} → Authentication. Move {{redirect_uri}} from “Mobile and desktop applications” to the "
        "Web platform, and set “Allow public client flows” to No.",
    ),
    700027: _app_setup(
        "The certificate does not match the app registration",
        "Postdesk signed its request with a certificate whose public key is not uploaded to this app "
        "registration.",
        f"{_APP} → Certificates & secrets → Certificates → Upload certificate, and upload the public part "
        f"(.cer or .pem) of the certificate saved in {_POSTDESK_APP}.",
    ),
    9002325: _app_setup(
        "The redirect URI is registered as a single-page application",
        "Microsoft treats the redirect URI as a browser (SPA) app and insists the sign-in code is "
        "redeemed from the browser, but Postdesk redeems it on its server.",
        f"{_APP} → Authentication. Remove {{redirect_uri}} from “Single-page application” and add it "
        "under the Web platform instead.",
    ),
    700024: _SERVER_CLOCK,
    500133: _SERVER_CLOCK,
    90002: _app_setup(
        "The tenant was not found",
        "Microsoft has no directory called {tenant} in this cloud: a typo, a domain that is not verified "
        "in your tenant, or the wrong cloud setting.",
        f"Use the Directory (tenant) ID from App registrations → your app → Overview as tenant in "
        f"{_POSTDESK_APP}, and check the cloud setting (global, US Government or China).",
    ),
    90019: _TENANT_UNKNOWN,
    50059: _TENANT_UNKNOWN,
    50128: _TENANT_UNKNOWN,
    90130: _TENANT_UNKNOWN,
    90124: _TENANT_UNKNOWN,
    9001023: _TENANT_UNKNOWN,
    50107: _app_setup(
        "Microsoft could not match the tenant to a sign-in setup",
        "The tenant or domain in the request does not lead to a working sign-in configuration. This "
        "often happens with a domain whose federation (for example AD FS) is incomplete.",
        f"Enter the Directory (tenant) ID GUID instead of a domain in {_POSTDESK_APP}. If the users' "
        "domain is federated, ask whoever runs that identity provider to check its federation settings.",
    ),
    700054: _app_setup(
        "ID tokens are not enabled for this app",
        "The sign-in request asked Microsoft for an ID token straight from the sign-in page, which this "
        "app registration does not allow.",
        "Postdesk's own sign-in does not need this: start the connection from Postdesk's Channels screen. "
        f"If it still appears, open {_APP_PATH} → Authentication in the Entra admin center, tick “ID "
        "tokens” under Implicit grant and hybrid flows, and save.",
    ),
    700051: _report(
        "The sign-in asked for a token type this app does not allow",
        "The request asked for an access token straight from the sign-in page (implicit grant). Postdesk "
        "never asks for that, so the link probably did not come from Postdesk.",
        "Start the connection from Postdesk's Channels screen instead of a saved or copied link. There is "
        "no need to turn on implicit grant. If it keeps appearing, report it with the support reference.",
    ),
    65005: _app_setup(
        "The app registration does not list the permissions Postdesk needs",
        "Postdesk asked for a permission that is missing from the app's API permissions, or Microsoft "
        "could not find the service that provides it.",
        f"{_APP} → API permissions → Add a permission → Microsoft Graph → Delegated permissions. Add "
        "openid, email, profile, offline_access, IMAP.AccessAsUser.All and SMTP.Send, then click “Grant "
        "admin consent”. Also check that the organization has Exchange Online.",
    ),
    70011: _app_setup(
        "Postdesk asked for a permission Microsoft does not recognise",
        "The requested scope is not valid here, most often because the cloud setting (global, US "
        "Government or China) does not match the cloud your tenant lives in.",
        f"Check the cloud in {_POSTDESK_APP}. If it is right, report the problem with the support reference.",
    ),
    900144: _app_setup(
        "A required value was missing from the request",
        "Microsoft says the request lacked {parameter}.",
        "Check that Postdesk's Channels › Microsoft 365 app form is complete (client ID, tenant, and a "
        "secret or certificate) and save it again. If everything is filled in, report the problem with "
        "the support reference.",
    ),
    500011: _RESOURCE_MISSING,
    50001: _RESOURCE_MISSING,
    7000112: _APP_DISABLED,
    70001: _APP_DISABLED,
    50105: _app_setup(
        "The account is not assigned to the Postdesk app",
        "The Postdesk app requires assignment in {tenant}, and the account that signed in is not assigned.",
        "In the Entra admin center open Enterprise applications → your Postdesk app → Users and groups → "
        "Add user/group and add this account (or a group it is in). Or set “Assignment required?” to No "
        "under Properties. Then sign in again.",
    ),
    # --- an administrator must approve Postdesk's permissions ---
    65001: _consent(
        "Nobody has approved Postdesk's permissions yet",
        "Neither this user nor an administrator has consented to Postdesk using the requested "
        "permissions in {tenant}.",
        "Ask an administrator who can grant tenant-wide consent (for example a Global Administrator or "
        "Privileged Role Administrator) to open {admin_consent_url} and accept. Or: "
        f"in the Entra admin center open {_APP_PATH} → API permissions → “Grant admin consent”. Then sign "
        "in to the mailbox again.",
    ),
    90094: _consent(
        "An administrator has to approve Postdesk",
        "Your organization does not let users approve apps themselves, or Postdesk asks for a "
        "permission that only an administrator can grant.",
        "Ask an administrator who can grant tenant-wide consent to open {admin_consent_url} and accept, "
        "or to click “Grant admin consent” under App registrations → your app → API permissions. Then "
        "sign in to the mailbox again.",
    ),
    90095: _consent(
        "An administrator has to approve Postdesk",
        "Your organization uses an admin consent workflow: the user can request approval, but cannot "
        "approve the app alone.",
        "Ask an administrator to approve the request under Entra admin center → Enterprise applications "
        "→ Admin consent requests, or to open {admin_consent_url}. Then sign in to the mailbox again.",
    ),
    # --- the person signing in has to do something ---
    65004: _person(
        "The permission request was declined",
        "The person signing in clicked Cancel on Microsoft's permission screen.",
        "Start the connection again and choose Accept. If your organization wants to review Postdesk "
        "first, an administrator can approve it for everyone: {admin_consent_url}.",
    ),
    50020: _person(
        "This account does not belong to the expected organization",
        "The account that signed in is from another organization, or is a personal Microsoft account, "
        "and does not exist in {tenant}.",
        "Sign in with the mailbox's work account in {tenant}; check the account picker, as the browser "
        "may offer another signed-in account. Mailboxes of other organizations can connect only if the "
        "app is multitenant and Postdesk's tenant is 'organizations'.",
    ),
    90072: _person(
        "This account cannot complete sign-in in this organization",
        "The account is from another organization and has no guest account in {tenant}, so it cannot "
        "meet the tenant's MFA requirement.",
        "Sign in with an account that belongs to {tenant}.",
    ),
    53003: _person(
        "A Conditional Access policy blocked the sign-in",
        "A Conditional Access policy in {tenant} refused to issue a token, for example because of the "
        "location, device or app. Postdesk refreshes tokens from its server, so location rules apply to "
        "the server's IP address too.",
        "An Entra admin can see which policy applied: Entra admin center → Monitoring & health → Sign-in "
        "logs → the failed sign-in → Conditional Access. Adjust that policy or exclude the Postdesk app, "
        "then sign in again.",
        status="error",
    ),
    530003: _DEVICE_POLICY,
    53000: _DEVICE_POLICY,
    50076: _MFA_NEEDED,
    50074: _MFA_NEEDED,
    50078: _MFA_NEEDED,
    50079: _person(
        "The account has to set up multifactor authentication",
        "Your organization requires MFA, and this account has not registered a method yet.",
        "The account's user registers a method at https://aka.ms/mysecurityinfo, then signs in again from "
        "Postdesk (Channels › this mailbox › “Re-authenticate”).",
    ),
    50072: _person(
        "The account has to set up multifactor authentication",
        "Your organization requires MFA, and this account has not registered a method yet.",
        "The account's user registers a method at https://aka.ms/mysecurityinfo, then signs in again from "
        "Postdesk (Channels › this mailbox › “Re-authenticate”).",
    ),
    50158: _person(
        "An extra security check was not completed",
        "Your organization requires an additional verification (for example from another MFA provider), "
        "and it was not completed.",
        "Sign in again and complete the extra check. If it cannot be completed, contact whoever runs that "
        "verification service.",
    ),
    50126: _person(
        "Wrong username or password",
        "Microsoft could not verify the username and password entered.",
        "Sign in again with the right password. Several failed tries in a row can lock the account for a "
        "while.",
    ),
    50053: _person(
        "The account is temporarily locked",
        "Too many failed sign-ins, or sign-ins from a suspicious address, made Microsoft lock the account.",
        "Wait and try again later, or ask an Entra admin to check the failed sign-in under Monitoring & "
        "health → Sign-in logs.",
    ),
    50034: _person(
        "The account does not exist in this directory",
        "The username was mistyped, or the account belongs to another tenant than {tenant}.",
        "Sign in again with the account's sign-in name (UPN), which can differ from its email address. If "
        "the account is in another tenant, check the tenant in Postdesk under Channels › Microsoft 365 app.",
    ),
    50057: _person(
        "The user account is disabled",
        "The account is disabled in Entra ID. Shared mailboxes have a disabled account on purpose, so they "
        "cannot sign in themselves.",
        "For a shared mailbox, sign in as a user with Full Access to it and enter the shared mailbox's "
        "address in Postdesk. Otherwise an admin re-enables the account: Entra admin center → Users → the "
        "user → Properties → Account enabled.",
        status="error",
    ),
    50055: _person(
        "The account's password has expired",
        "The password of the account that connected this mailbox has expired.",
        "The user sets a new password (for example at https://myaccount.microsoft.com), then clicks “Sign "
        "in again” for this mailbox in Postdesk.",
    ),
    50199: _person(
        "Microsoft asked to confirm the app",
        "For security, Microsoft showed a page asking the user to confirm they meant to sign in to this "
        "app, and it was not confirmed.",
        "Start the connection again and confirm when Microsoft asks.",
    ),
    81010: _person(
        "Automatic Windows sign-in failed",
        "Seamless single sign-on could not use the Windows (Kerberos) ticket: it has expired or is not "
        "valid.",
        "Sign in again and enter the username and password when asked. If it keeps happening, sign out of "
        "Windows and back in, or ask IT to check Seamless SSO.",
    ),
    135011: _person(
        "The device used to sign in is disabled",
        "The device the user signed in from is disabled in Entra ID.",
        "Sign in from another device, or ask an admin to enable this one under Entra admin center → Devices.",
    ),
    # --- not your setup: Postdesk itself or a malformed request ---
    28000: _report(
        "Postdesk asked for permissions on two services at once",
        "One token request may cover only one service (Outlook or Microsoft Graph), and this one mixed them.",
        "This is a Postdesk problem, not your setup. Try again; if it repeats, report it with the support "
        "reference.",
    ),
    9002313: _report(
        "Microsoft rejected the sign-in request as malformed",
        "The request had a missing or invalid value, often because a link was cut off, reused, or "
        "rewritten by a proxy.",
        "Start again from Postdesk's Channels screen. If it keeps failing, check that POSTDESK_BASE_URL is "
        "Postdesk's exact public address and report the problem with the support reference.",
    ),
    # --- transient: Postdesk retries with backoff ---
    50196: _retry(
        "Too many identical sign-in requests",
        "Microsoft saw the same token request repeated too quickly (a loop) and refused it for now.",
        "Postdesk waits and retries with a growing delay. If this keeps happening, report it with the "
        "support reference: Postdesk is asking Microsoft too often.",
    ),
    90055: _retry(
        "Microsoft is throttling sign-ins for this tenant",
        "Too many requests reached Microsoft's sign-in service for {tenant} in a short time.",
        "Postdesk waits and retries. If it lasts, look for other apps in the tenant that send many "
        "sign-in requests.",
    ),
    90033: _retry(
        "Microsoft's directory service is temporarily unavailable",
        "Microsoft could not reach its own directory service.",
    ),
    50000: _SERVICE_HICCUP,
    50033: _SERVICE_HICCUP,
    50087: _SERVICE_HICCUP,
    70012: _SERVICE_HICCUP,
    90006: _SERVICE_HICCUP,
    90012: _SERVICE_HICCUP,
    90024: _SERVICE_HICCUP,
    90090: _SERVICE_HICCUP,
}

_BY_ERROR: dict[str, Explanation] = {
    "access_denied": _person(
        "Sign-in was cancelled",
        "The person signing in cancelled or closed Microsoft's sign-in page.",
        "Start the connection again from Postdesk's Channels screen when ready.",
    ),
    "invalid_client": _app_setup(
        "Microsoft rejected Postdesk's app credentials",
        "The client secret or certificate saved in Postdesk is wrong, expired, or belongs to another app.",
        f"{_APP} → Certificates & secrets. Create a new client secret and paste its Value (not the "
        f"Secret ID) into {_POSTDESK_APP}.",
    ),
    "unauthorized_client": _APP_NOT_FOUND,
    "invalid_grant": _reauth(
        "The saved sign-in is no longer valid",
        "Microsoft no longer accepts the sign-in Postdesk holds for this mailbox: it expired, was revoked, "
        "or was already used.",
    ),
    "login_required": _reauth(
        "A new sign-in is needed",
        "Microsoft needs the person to sign in again before it issues tokens for this mailbox.",
    ),
    "interaction_required": _person(
        "Microsoft needs the person to sign in interactively",
        "A policy asks for a step Postdesk cannot do in the background, such as MFA or accepting terms.",
        "Click “Re-authenticate” for this mailbox in Postdesk's Channels screen and complete what Microsoft "
        "asks.",
    ),
    "consent_required": _consent(
        "Postdesk's permissions have not been approved",
        "Microsoft needs consent for the permissions Postdesk requests in {tenant}.",
        "Ask an administrator to open {admin_consent_url} and accept, then sign in to the mailbox again.",
    ),
    "invalid_scope": _app_setup(
        "Postdesk asked for a permission Microsoft does not accept",
        "The requested permissions are not valid for this app or cloud.",
        f"Check the cloud in {_POSTDESK_APP}, and that the app has the delegated permissions listed there.",
    ),
    "invalid_resource": _RESOURCE_MISSING,
    "temporarily_unavailable": _retry(
        "Microsoft's sign-in service is busy",
        "Microsoft reported that it is temporarily too busy to answer.",
    ),
    "server_error": _retry(
        "Microsoft's sign-in service had an internal error",
        "Microsoft reported an unexpected error on its side.",
    ),
}

_UNKNOWN = _report(
    "Microsoft sign-in failed ({code})",
    "Postdesk has no specific explanation for this error yet. Microsoft's message: {microsoft_message}",
    "Look up {code_number} at {login_url}/error and follow the fix it gives. Keep the Trace ID and "
    "Correlation ID shown below: Microsoft support needs them to find the request.",
)


_LOOKUP_HINT = " If that does not help, look up {code_number} at {login_url}/error."


def _explain_by_error(err: IdentityError) -> Explanation:
    if err.error == "access_denied" and err.aadsts is not None:
        return _UNKNOWN  # an access_denied with a code is a specific refusal, not a cancel
    template = _BY_ERROR.get(err.error)
    if template is None:
        return _UNKNOWN
    if err.aadsts is not None:  # a code Postdesk does not know yet: the lookup page may know more
        return replace(template, fix=template.fix + _LOOKUP_HINT)
    return template
