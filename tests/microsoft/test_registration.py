"""The "Connect Microsoft 365 App" form: catching copy-paste mistakes before Microsoft does."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from postdesk.microsoft.registration import (
    ACCOUNT_TYPES,
    CONSENT_SCOPES,
    REQUIRED_DELEGATED_PERMISSIONS,
    UNSUPPORTED_ACCOUNT_TYPE,
    FormProblem,
    admin_consent_url,
    normalise_tenant,
    redirect_uri_for,
    validate_app_registration,
)

CLIENT_ID = "1b7e4c2a-8f3d-4e6b-9a01-5c2d7e8f9a0b"
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SECRET_VALUE = "ibU8Q~eMTkYohSjp86zv8VygDsrj74hzYXuaubYm"
SECRET_ID = "3445dd15-e735-40b6-8a1e-089f691d8228"


def problems(**changes: Any) -> list[FormProblem]:
    form: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "tenant": TENANT_ID,
        "client_secret": SECRET_VALUE,
        "has_certificate": False,
        "cloud": "global",
        "base_url": "https://helpdesk.example.com",
        "account_types": "single",
    }
    form.update(changes)
    return validate_app_registration(**form)


def only(field: str, **changes: Any) -> FormProblem:
    found = [problem for problem in problems(**changes) if problem.field == field]
    assert len(found) == 1, found
    return found[0]


def test_it_accepts_a_correct_single_tenant_form() -> None:
    assert problems() == []


# --- client ID -------------------------------------------------------------------------------------


def test_it_asks_for_the_client_id_when_it_is_empty() -> None:
    problem = only("client_id", client_id="  ")

    assert problem.severity == "error"
    assert "copy it from the app's Overview page" in problem.message


def test_it_rejects_a_client_id_that_is_not_a_guid() -> None:
    problem = only("client_id", client_id="postdesk-app")

    assert problem.message.startswith(
        "This is not a client ID. The Application (client) ID is a GUID like 1b7e"
    )


def test_it_warns_that_the_object_id_is_a_different_value() -> None:
    assert "The Object ID on the same page is a different value." in only("client_id", client_id="x").message


def test_it_spots_the_tenant_id_pasted_into_the_client_id() -> None:
    problem = only("client_id", client_id=TENANT_ID.upper())

    assert problem.severity == "error"
    assert "same as the tenant ID" in problem.message


# --- tenant ----------------------------------------------------------------------------------------


def test_it_explains_a_single_tenant_app_needs_a_tenant_or_fails_with_aadsts50194() -> None:
    problem = only("tenant", tenant="")

    assert problem.severity == "error"
    assert "AADSTS50194" in problem.message
    assert "Directory (tenant) ID" in problem.message


def test_it_suggests_organizations_when_a_multitenant_app_has_no_tenant() -> None:
    assert "'organizations'" in only("tenant", tenant="", account_types="multi").message


def test_it_says_personal_only_accounts_are_not_supported() -> None:
    problem = only("tenant", tenant="consumers", account_types="multi_personal")

    assert problem.severity == "error"
    assert "not supported" in problem.message


@pytest.mark.parametrize("shared", ["common", "organizations", "Common"])
def test_it_refuses_shared_tenants_for_a_single_tenant_app(shared: str) -> None:
    problem = only("tenant", tenant=shared)

    assert problem.severity == "error"
    assert "works only for multitenant apps" in problem.message
    assert "AADSTS50194" in problem.message


def test_it_accepts_organizations_for_a_multitenant_app() -> None:
    assert problems(tenant="organizations", account_types="multi") == []


def test_it_suggests_organizations_instead_of_common_for_work_accounts_only() -> None:
    problem = only("tenant", tenant="common", account_types="multi")

    assert problem.severity == "warning"
    assert "'organizations'" in problem.message


def test_it_accepts_common_when_personal_accounts_are_allowed() -> None:
    assert [p.field for p in problems(tenant="common", account_types="multi_personal")] == ["account_types"]


@pytest.mark.parametrize("domain", ["contoso.onmicrosoft.com", "Contoso.COM", "help.example.co.uk"])
def test_it_accepts_a_domain_as_tenant(domain: str) -> None:
    assert problems(tenant=domain) == []


def test_it_asks_for_the_domain_when_an_email_address_is_entered() -> None:
    problem = only("tenant", tenant="admin@contoso.com")

    assert problem.message == "Enter the domain only (contoso.com), not an email address."


@pytest.mark.parametrize("value", ["contoso", "not a tenant", "72f988bf-86f1-41af"])
def test_it_rejects_a_tenant_that_is_neither_guid_nor_domain(value: str) -> None:
    problem = only("tenant", tenant=value)

    assert problem.severity == "error"
    assert "is not a tenant" in problem.message


def test_it_accepts_a_tenant_pasted_as_a_login_url() -> None:
    assert problems(tenant=f"https://login.microsoftonline.com/{TENANT_ID}/oauth2/v2.0/authorize") == []


# --- client secret ---------------------------------------------------------------------------------


def test_it_asks_for_a_secret_or_certificate_when_neither_is_given() -> None:
    problem = only("client_secret", client_secret=None)

    assert problem.severity == "error"
    assert "or upload a certificate" in problem.message


def test_it_does_not_need_a_secret_when_a_certificate_is_uploaded() -> None:
    assert problems(client_secret="", has_certificate=True) == []


def test_it_tells_the_admin_they_pasted_the_secret_id() -> None:
    problem = only("client_secret", client_secret=SECRET_ID)

    assert problem.severity == "error"
    assert "You pasted the Secret ID; paste the secret Value instead" in problem.message
    assert "shown only once" in problem.message
    assert "create a new secret" in problem.message


def test_it_warns_about_whitespace_around_the_secret() -> None:
    problem = only("client_secret", client_secret=f"  {SECRET_VALUE}\n")

    assert problem.severity == "warning"
    assert "Postdesk removes them" in problem.message


def test_it_still_spots_a_secret_id_with_whitespace_around_it() -> None:
    found = {(p.severity, p.message[:20]) for p in problems(client_secret=f" {SECRET_ID} ")}

    assert ("error", "You pasted the Secre") in found


def test_it_warns_about_an_implausibly_short_secret() -> None:
    problem = only("client_secret", client_secret="abc8Q~short")

    assert problem.severity == "warning"
    assert "only 11 characters" in problem.message


# --- cloud, base URL, account types ----------------------------------------------------------------


@pytest.mark.parametrize("cloud", ["global", "usgov", "china"])
def test_it_accepts_each_supported_cloud(cloud: str) -> None:
    assert problems(cloud=cloud) == []


def test_it_rejects_an_unknown_cloud_and_lists_the_choices() -> None:
    problem = only("cloud", cloud="germany")

    assert problem.severity == "error"
    assert "'global'" in problem.message
    assert "'usgov'" in problem.message
    assert "'china'" in problem.message


def test_it_warns_that_plain_http_only_works_for_localhost() -> None:
    problem = only("base_url", base_url="http://helpdesk.example.com")

    assert problem.severity == "warning"
    assert "only for localhost" in problem.message
    assert "unencrypted" in problem.message


@pytest.mark.parametrize("url", ["http://localhost:8025", "http://127.0.0.1:8025", "http://[::1]:8025"])
def test_it_accepts_plain_http_on_this_machine(url: str) -> None:
    assert problems(base_url=url) == []


@pytest.mark.parametrize("url", ["helpdesk.example.com", "", "ftp://helpdesk.example.com", "https://"])
def test_it_asks_for_the_full_address_when_the_base_url_is_incomplete(url: str) -> None:
    problem = only("base_url", base_url=url)

    assert problem.severity == "error"
    assert "https://helpdesk.example.com" in problem.message


def test_it_rejects_a_base_url_with_a_fragment() -> None:
    assert "“#”" in only("base_url", base_url="https://helpdesk.example.com/#/home").message


def test_it_warns_that_postdesk_is_not_built_for_personal_accounts() -> None:
    problem = only("account_types", tenant="organizations", account_types="multi_personal")

    assert problem.severity == "warning"
    assert "Outlook.com" in problem.message


def test_it_reports_problems_in_the_order_of_the_form() -> None:
    found = problems(client_id="", tenant="", client_secret=None, cloud="mars", base_url="x")

    assert [p.field for p in found] == ["client_id", "tenant", "client_secret", "cloud", "base_url"]


# --- helpers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pasted", "tenant"),
    [
        ("  Contoso.OnMicrosoft.com  ", "contoso.onmicrosoft.com"),
        (TENANT_ID.upper(), TENANT_ID),
        (f"https://login.microsoftonline.com/{TENANT_ID}/v2.0", TENANT_ID),
        ("https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token", "contoso.com"),
        ("login.microsoftonline.us/Contoso.us/", "contoso.us"),
        ("contoso.com.", "contoso.com"),
    ],
)
def test_it_normalises_what_admins_paste_as_tenant(pasted: str, tenant: str) -> None:
    assert normalise_tenant(pasted) == tenant


def test_it_builds_the_redirect_uri_from_the_base_url() -> None:
    assert (
        redirect_uri_for("https://helpdesk.example.com/")
        == "https://helpdesk.example.com/auth/microsoft365/callback"
    )


def test_it_builds_microsofts_v2_admin_consent_url() -> None:
    url = admin_consent_url(
        login_url="https://login.microsoftonline.com/",
        tenant=TENANT_ID,
        client_id=CLIENT_ID,
        redirect_uri="https://helpdesk.example.com/auth/microsoft365/callback",
        state="s t&ate",
    )
    parts = urlsplit(url)
    query = parse_qs(parts.query)

    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == (
        f"https://login.microsoftonline.com/{TENANT_ID}/v2.0/adminconsent"
    )
    assert query["client_id"] == [CLIENT_ID]
    assert query["redirect_uri"] == ["https://helpdesk.example.com/auth/microsoft365/callback"]
    assert query["state"] == ["s t&ate"]
    assert query["scope"][0].split(" ") == list(CONSENT_SCOPES)


def test_it_requests_consent_for_imap_smtp_and_offline_access() -> None:
    assert "https://outlook.office.com/IMAP.AccessAsUser.All" in CONSENT_SCOPES
    assert "https://outlook.office.com/SMTP.Send" in CONSENT_SCOPES
    assert "offline_access" in CONSENT_SCOPES


def test_it_never_sends_admins_to_consent_through_common() -> None:
    url = admin_consent_url(
        login_url="https://login.microsoftonline.com",
        tenant="common",
        client_id=CLIENT_ID,
        redirect_uri="https://helpdesk.example.com/cb",
        state="x",
    )

    assert urlsplit(url).path == "/organizations/v2.0/adminconsent"


def test_it_lists_the_six_delegated_permissions_postdesk_needs() -> None:
    names = [permission.name for permission in REQUIRED_DELEGATED_PERMISSIONS]

    assert names == ["openid", "email", "profile", "offline_access", "IMAP.AccessAsUser.All", "SMTP.Send"]
    assert all(permission.purpose.endswith(".") for permission in REQUIRED_DELEGATED_PERMISSIONS)


def test_it_offers_the_three_supported_account_types_with_portal_labels() -> None:
    assert [choice.key for choice in ACCOUNT_TYPES] == ["single", "multi", "multi_personal"]
    assert ACCOUNT_TYPES[1].portal_label == (
        "Accounts in any organizational directory (Any Microsoft Entra ID tenant - Multitenant)"
    )


def test_it_says_personal_only_is_not_a_supported_account_type() -> None:
    assert "Personal Microsoft accounts only" in UNSUPPORTED_ACCOUNT_TYPE
    assert "not supported" in UNSUPPORTED_ACCOUNT_TYPE
