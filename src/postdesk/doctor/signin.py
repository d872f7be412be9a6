"""The doctor's sign-in layers: settings, authority discovery, the access token and what it is for."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import jwt
import requests

from postdesk.db.models import Channel, ChannelStatus, MicrosoftApp
from postdesk.doctor.model import CheckFailed, Probe
from postdesk.microsoft.clouds import CLOUDS, Cloud
from postdesk.microsoft.errors import IdentityError, explain, support_reference
from postdesk.microsoft.identity import MicrosoftIdentity, NotConfigured
from postdesk.microsoft.tokens import TokenError, acquire_access_token

_APP_SETTINGS = "Channels › Microsoft 365 app (or `postdesk microsoft365 app set`)"
_REAUTHENTICATE = "On the mailbox's page choose Re-authenticate and sign in as the mailbox (or its delegate)."
# Exchange Online's resource under its URI and app ID; Microsoft Graph's likewise.
_OUTLOOK_APP_ID = "00000002-0000-0ff1-ce00-000000000000"
_GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
REQUIRED_SCOPES = ("IMAP.AccessAsUser.All", "SMTP.Send")
APP_ROLES = ("IMAP.AccessAsApp", "SMTP.SendAsApp")


def settings_complete(probe: Probe) -> str:
    with probe.runtime.sessions() as session:
        channel = session.get(Channel, probe.channel_id)
        if channel is None:
            raise CheckFailed("The mailbox was deleted while it was being tested.", "Nothing to do.")
        app = _complete_registration(channel.microsoft_app)
        if not channel.token_cache or not channel.account_oid:
            raise CheckFailed("Postdesk holds no sign-in for this mailbox.", _REAUTHENTICATE)
        probe.identity = MicrosoftIdentity(probe.runtime.settings, app)
        disabled = (
            " The mailbox is disabled: Postdesk neither reads nor sends through it."
            if channel.status is ChannelStatus.DISABLED
            else ""
        )
        return (
            f"App {app.client_id} in tenant {app.tenant} ({app.cloud} cloud), signing in with a "
            f"{app.credential_kind}; mailbox signed in as {probe.login_name}.{disabled}"
        )


def _complete_registration(app: MicrosoftApp | None) -> MicrosoftApp:
    if app is None:
        raise CheckFailed(
            "This mailbox is linked to no Microsoft 365 app registration, so Postdesk cannot ask "
            "Microsoft for its tokens.",
            f"Enter the app registration under {_APP_SETTINGS}. Then: {_REAUTHENTICATE}",
        )
    missing = [label for label, value in (("client ID", app.client_id), ("tenant", app.tenant)) if not value]
    if missing or app.cloud not in CLOUDS:
        raise CheckFailed(
            f"The app registration is incomplete: {', '.join(missing) or 'the cloud'} is missing.",
            f"Complete it under {_APP_SETTINGS}.",
        )
    if app.credential_kind is None:
        raise CheckFailed(
            "The app registration has neither a client secret nor a certificate to sign in with.",
            "In Entra ID create a client secret (Certificates & secrets › New client secret; copy the "
            f"Value, not the Secret ID) and enter it under {_APP_SETTINGS}, or generate a certificate there.",
        )
    return app


def authority_discovery(probe: Probe) -> str:
    identity = _identity(probe)
    url = f"{identity.authority}/v2.0/.well-known/openid-configuration"
    try:
        document = identity.openid_configuration(fresh=True)  # what the network says now
    except requests.HTTPError as exc:
        raise _refusal(identity, exc.response, url) from exc
    except requests.RequestException as exc:
        raise _unreachable(identity.endpoints.login_url, exc, url) from exc
    except ValueError as exc:  # a body that is not JSON
        raise _not_microsoft(identity, url, "an answer that is not JSON") from exc
    if not isinstance(document, Mapping) or "token_endpoint" not in document:
        raise _not_microsoft(identity, url, "a document without a token endpoint")
    return f"{url} answered; issuer {document.get('issuer', '?')}."


def token_acquisition(probe: Probe) -> str:
    identity = _identity(probe)
    with probe.runtime.sessions() as session:
        channel = session.get(Channel, probe.channel_id)
        assert channel is not None
        try:
            # Forced: a cached access token would hide a refresh token Microsoft no longer accepts.
            token = acquire_access_token(session, identity, channel, force_refresh=True)
        except TokenError as exc:
            explanation = exc.explanation
            raise CheckFailed(
                f"{explanation.title}. {explanation.cause}", explanation.fix, detail=exc.reference
            ) from exc
        except NotConfigured as exc:
            fix = f"Fix it under {_APP_SETTINGS}."
            raise CheckFailed(f"The app registration cannot sign in: {exc}.", fix) from exc
        except requests.RequestException as exc:
            raise _unreachable(identity.endpoints.login_url, exc, "the token endpoint") from exc
        finally:
            session.commit()  # a rotated refresh token must never be lost
        how = (
            "The app signed in as itself (app-only)" if channel.app_only else "The refresh token was redeemed"
        )
    probe.access_token = token.value
    return f"{how}; the new access token is valid until {token.expires_at:%Y-%m-%d %H:%M} UTC."


def token_claims(probe: Probe) -> str:
    assert probe.access_token is not None
    return check_token_claims(probe.access_token, probe.cloud)


def check_token_claims(access_token: str, cloud: Cloud) -> str:
    """Whether the token is for Exchange Online with the IMAP and SMTP scopes; raises ``CheckFailed``."""
    try:
        # Read, not verified: Exchange verifies the token; Postdesk only looks at what it was given.
        claims: dict[str, Any] = jwt.decode(access_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return "The access token is not a JWT, so its claims cannot be read; the sign-ins below test it."
    audience = str(claims.get("aud") or "").rstrip("/")
    user = str(claims.get("upn") or claims.get("unique_name") or claims.get("preferred_username") or "?")
    _check_audience(audience, cloud)
    scopes = str(claims.get("scp") or "").split()
    if not scopes and claims.get("roles"):  # app-only: application permissions, no user
        roles = [str(role) for role in claims["roles"]]
        missing_roles = [name for name in APP_ROLES if name.lower() not in {r.lower() for r in roles}]
        if missing_roles:
            raise CheckFailed(
                f"The app's token lacks the application permission{'s' * (len(missing_roles) > 1)} "
                f"{' and '.join(missing_roles)}, so Exchange will refuse it.",
                "In Entra ID open App registrations › the app › API permissions, add "
                f"{' and '.join(missing_roles)} (Office 365 Exchange Online › Application permissions) and "
                "grant admin consent.",
                detail=f"aud {audience}; roles: {' '.join(roles)}",
            )
        return f"For {audience} (Exchange Online), app-only, roles: {' '.join(roles)}."
    missing = [name for name in REQUIRED_SCOPES if name.lower() not in {s.lower() for s in scopes}]
    if missing:
        raise CheckFailed(
            f"The token lacks the permission{'s' * (len(missing) > 1)} {' and '.join(missing)}, so "
            "Exchange will refuse it.",
            "In Entra ID open App registrations › the app › API permissions, add the delegated "
            f"permission{'s' * (len(missing) > 1)} {' and '.join(missing)} (Microsoft Graph › Delegated), "
            f"grant admin consent, then: {_REAUTHENTICATE}",
            detail=f"aud {audience}; scopes: {' '.join(scopes) or 'none'}",
        )
    return f"For {audience} (Exchange Online), user {user}, scopes: {' '.join(scopes)}."


def _check_audience(audience: str, cloud: Cloud) -> None:
    outlook = {cloud.outlook_resource, _OUTLOOK_APP_ID} | (
        {"https://outlook.office.com", "https://outlook.office365.com"} if cloud.name == "global" else set()
    )
    if audience.lower() in {value.lower() for value in outlook}:
        return
    graph = {c.graph_url for c in CLOUDS.values()} | {_GRAPH_APP_ID}
    if audience.lower() in {value.lower() for value in graph}:
        raise CheckFailed(
            f"The access token is for Microsoft Graph ({audience}), not for Exchange Online "
            f"({cloud.outlook_resource}). IMAP and SMTP refuse Graph tokens: this is the classic mistake "
            "of asking for IMAP.AccessAsUser.All or SMTP.Send without the Outlook resource in front.",
            f"Postdesk asks for {cloud.outlook_resource}/IMAP.AccessAsUser.All and …/SMTP.Send. Check "
            "POSTDESK_MICROSOFT_LOGIN_URL and the app's cloud (something between Postdesk and Microsoft "
            f"answers for another resource), then: {_REAUTHENTICATE}",
            detail=f"aud {audience}",
        )
    raise CheckFailed(
        f"The access token is for {audience or 'no audience'}, not for Exchange Online "
        f"({cloud.outlook_resource}).",
        "Set the app's cloud (global, US Government or China) to the one the tenant lives in, under "
        f"{_APP_SETTINGS}, then: {_REAUTHENTICATE}",
        detail=f"aud {audience}",
    )


def _identity(probe: Probe) -> MicrosoftIdentity:
    assert probe.identity is not None, "settings_complete runs first"
    return probe.identity


def _refusal(identity: MicrosoftIdentity, response: requests.Response | None, url: str) -> CheckFailed:
    try:
        body = response.json() if response is not None else None
    except ValueError:
        body = None
    if not isinstance(body, Mapping) or "error" not in body:
        status = response.status_code if response is not None else "?"
        return _not_microsoft(identity, url, f"HTTP {status}")
    error = IdentityError.from_token_response(body)
    registration = identity.registration
    explanation = explain(
        error,
        context={
            "tenant": registration.tenant,
            "client_id": registration.client_id,
            "login_url": identity.endpoints.login_url,
        },
    )
    return CheckFailed(
        f"{explanation.title}. {explanation.cause}", explanation.fix, detail=support_reference(error)
    )


def _not_microsoft(identity: MicrosoftIdentity, url: str, answer: str) -> CheckFailed:
    return CheckFailed(
        f"{url} gave {answer}, not the tenant's OpenID configuration.",
        "Check POSTDESK_MICROSOFT_LOGIN_URL (unset it to use Microsoft's) and the tenant under "
        f"{_APP_SETTINGS}; the login host now is {identity.endpoints.login_url}.",
    )


def _unreachable(login_url: str, exc: requests.RequestException, what: str) -> CheckFailed:
    host = urlsplit(login_url).netloc
    if isinstance(exc, requests.exceptions.SSLError):
        return CheckFailed(
            f"The TLS certificate of {host} is not trusted ({_reason(exc)}).",
            "If a proxy inspects TLS, add its CA certificate to the file named by POSTDESK_CA_BUNDLE; "
            "otherwise check POSTDESK_MICROSOFT_LOGIN_URL and the server's CA certificates.",
            detail=what,
        )
    return CheckFailed(
        f"Postdesk cannot reach {host}: {_reason(exc)}.",
        f"Check DNS, firewall and proxy: Postdesk needs outbound HTTPS to {host}. Check "
        "POSTDESK_MICROSOFT_LOGIN_URL and the app's cloud too.",
        detail=what,
    )


def _reason(exc: BaseException) -> str:
    # requests nests the socket error several levels deep; the innermost one says what happened.
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    return str(exc).strip() or exc.__class__.__name__
