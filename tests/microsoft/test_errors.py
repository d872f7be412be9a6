"""Microsoft identity errors: parsing Microsoft's error shapes and explaining them to an admin."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postdesk.microsoft.errors import (
    Explanation,
    IdentityError,
    Remedy,
    explain,
    is_transient,
    support_reference,
)

TRACE_ID = "0000aaaa-11bb-cccc-dd22-eeeeee333333"
CORRELATION_ID = "aaaa0000-bb11-2222-33cc-444444dddddd"
TIMESTAMP = "2026-11-26 10:00:00Z"
TRAILER = f"\r\nTrace ID: {TRACE_ID}\r\nCorrelation ID: {CORRELATION_ID}\r\nTimestamp: {TIMESTAMP}"

SECRET_ID_BODY: dict[str, object] = {
    "error": "invalid_client",
    "error_description": (
        "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is "
        "the client secret value, not the client secret ID, for a secret added to app "
        "'1b7e4c2a-8f3d-4e6b-9a01-5c2d7e8f9a0b'." + TRAILER
    ),
    "error_codes": [7000215],
    "timestamp": TIMESTAMP,
    "trace_id": TRACE_ID,
    "correlation_id": CORRELATION_ID,
    "error_uri": "https://login.microsoftonline.com/error?code=7000215",
}

CONTEXT = {
    "redirect_uri": "https://helpdesk.example.com/auth/microsoft365/callback",
    "client_id": "1b7e4c2a-8f3d-4e6b-9a01-5c2d7e8f9a0b",
    "tenant": "contoso.onmicrosoft.com",
    "admin_consent_url": "https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0/adminconsent?x=1",
}


def coded(code: int, error: str = "invalid_grant", message: str = "Something failed.") -> IdentityError:
    return IdentityError.from_token_response(
        {"error": error, "error_description": f"AADSTS{code}: {message}{TRAILER}", "error_codes": [code]}
    )


def is_fallback(explanation: Explanation) -> bool:
    return explanation.title.startswith("Microsoft sign-in failed")


# --- parsing ---------------------------------------------------------------------------------------


def test_it_parses_every_field_of_a_real_token_error_body() -> None:
    err = IdentityError.from_token_response(SECRET_ID_BODY)

    assert err.error == "invalid_client"
    assert err.aadsts == 7000215
    assert err.error_codes == (7000215,)
    assert err.trace_id == TRACE_ID
    assert err.correlation_id == CORRELATION_ID
    assert err.timestamp == TIMESTAMP
    assert err.description.startswith("AADSTS7000215: Invalid client secret provided.")


def test_it_reads_the_code_from_the_description_when_error_codes_is_missing() -> None:
    err = IdentityError.from_token_response(
        {"error": "invalid_request", "error_description": "AADSTS50011: The redirect URI does not match."}
    )

    assert err.aadsts == 50011


def test_it_reads_trace_and_correlation_ids_and_timestamp_from_the_description() -> None:
    err = IdentityError.from_token_response(
        {
            "error": "invalid_grant",
            "error_description": "AADSTS70008: The refresh token has expired." + TRAILER,
        }
    )

    assert (err.trace_id, err.correlation_id, err.timestamp) == (TRACE_ID, CORRELATION_ID, TIMESTAMP)


def test_it_prefers_ids_given_as_fields_over_those_in_the_description() -> None:
    body = {**SECRET_ID_BODY, "trace_id": "field-trace", "correlation_id": "field-correlation"}

    err = IdentityError.from_token_response(body)

    assert (err.trace_id, err.correlation_id) == ("field-trace", "field-correlation")


def test_it_reads_an_msal_result_dict_with_its_suberror() -> None:
    msal_result: dict[str, object] = {
        "error": "invalid_grant",
        "error_description": "AADSTS50173: The provided grant has expired due to it being revoked." + TRAILER,
        "error_codes": [50173],
        "suberror": "bad_token",
        "classification": "bad_token",
    }

    err = IdentityError.from_token_response(msal_result)

    assert (err.aadsts, err.suberror) == (50173, "bad_token")


def test_it_takes_the_code_from_the_error_uri_when_nothing_else_has_it() -> None:
    err = IdentityError.from_token_response(
        {"error": "invalid_client", "error_uri": "https://login.microsoftonline.com/error?code=7000222"}
    )

    assert err.aadsts == 7000222


def test_it_ignores_error_codes_that_are_not_numbers() -> None:
    err = IdentityError.from_token_response(
        {"error": "invalid_grant", "error_codes": [True, "abc", None, "70008"], "error_description": 5}
    )

    assert err.error_codes == (70008,)
    assert err.description == ""


def test_it_names_a_body_without_an_error_string_unknown_error() -> None:
    assert IdentityError.from_token_response({}).error == "unknown_error"


def test_it_parses_the_error_parameters_of_a_failed_callback() -> None:
    err = IdentityError.from_redirect(
        {
            "error": "invalid_request",
            "error_description": "AADSTS50011: The redirect URI 'http://x/cb' specified in the request does "
            "not match the redirect URIs configured for the application." + TRAILER,
            "state": "abc",
        }
    )

    assert (err.error, err.aadsts, err.error_codes) == ("invalid_request", 50011, (50011,))
    assert (err.trace_id, err.correlation_id, err.timestamp) == (TRACE_ID, CORRELATION_ID, TIMESTAMP)


def test_it_keeps_the_error_subcode_of_a_cancelled_sign_in() -> None:
    err = IdentityError.from_redirect(
        {"error": "access_denied", "error_subcode": "cancel", "error_description": "AADSTS65004 ..."}
    )

    assert (err.suberror, err.aadsts) == ("cancel", 65004)


# --- explanations ----------------------------------------------------------------------------------

# Every code Postdesk explains specifically, with who fixes it, and the channel's status on refresh.
EXPECTED: list[tuple[int, Remedy, str]] = [
    (50011, Remedy.FIX_APP_REGISTRATION, "error"),
    (500113, Remedy.FIX_APP_REGISTRATION, "error"),
    (50194, Remedy.FIX_APP_REGISTRATION, "error"),
    (700016, Remedy.FIX_APP_REGISTRATION, "error"),
    (7000215, Remedy.FIX_APP_REGISTRATION, "error"),
    (7000222, Remedy.FIX_APP_REGISTRATION, "error"),
    (7000218, Remedy.FIX_APP_REGISTRATION, "error"),
    (9002325, Remedy.FIX_APP_REGISTRATION, "error"),
    (65001, Remedy.ADMIN_CONSENT, "needs_reauth"),
    (65004, Remedy.USER_ACTION, "needs_reauth"),
    (90094, Remedy.ADMIN_CONSENT, "needs_reauth"),
    (50020, Remedy.USER_ACTION, "needs_reauth"),
    (53003, Remedy.USER_ACTION, "error"),
    (50076, Remedy.USER_ACTION, "needs_reauth"),
    (50079, Remedy.USER_ACTION, "needs_reauth"),
    (70008, Remedy.REAUTHENTICATE, "needs_reauth"),
    (700082, Remedy.REAUTHENTICATE, "needs_reauth"),
    (50173, Remedy.REAUTHENTICATE, "needs_reauth"),
    (70043, Remedy.REAUTHENTICATE, "needs_reauth"),
    (70000, Remedy.REAUTHENTICATE, "needs_reauth"),
    (54005, Remedy.REAUTHENTICATE, "needs_reauth"),
    (501481, Remedy.REAUTHENTICATE, "needs_reauth"),
    (28000, Remedy.CONTACT_SUPPORT, "error"),
    (50126, Remedy.USER_ACTION, "needs_reauth"),
    (50034, Remedy.USER_ACTION, "needs_reauth"),
    (50057, Remedy.USER_ACTION, "error"),
    (50055, Remedy.USER_ACTION, "needs_reauth"),
    (50058, Remedy.REAUTHENTICATE, "needs_reauth"),
    (50158, Remedy.USER_ACTION, "needs_reauth"),
    (700024, Remedy.FIX_APP_REGISTRATION, "error"),
    (500133, Remedy.FIX_APP_REGISTRATION, "error"),
    (90002, Remedy.FIX_APP_REGISTRATION, "error"),
    (90019, Remedy.FIX_APP_REGISTRATION, "error"),
    (50059, Remedy.FIX_APP_REGISTRATION, "error"),
    (700054, Remedy.FIX_APP_REGISTRATION, "error"),
    (700051, Remedy.CONTACT_SUPPORT, "error"),
    (65005, Remedy.FIX_APP_REGISTRATION, "error"),
    (70011, Remedy.FIX_APP_REGISTRATION, "error"),
    (9002313, Remedy.CONTACT_SUPPORT, "error"),
    (900144, Remedy.FIX_APP_REGISTRATION, "error"),
    (50199, Remedy.USER_ACTION, "needs_reauth"),
    (81010, Remedy.USER_ACTION, "needs_reauth"),
    (500011, Remedy.FIX_APP_REGISTRATION, "error"),
    (50001, Remedy.FIX_APP_REGISTRATION, "error"),
    (135011, Remedy.USER_ACTION, "needs_reauth"),
    (530003, Remedy.USER_ACTION, "error"),
    (90072, Remedy.USER_ACTION, "needs_reauth"),
    (50105, Remedy.FIX_APP_REGISTRATION, "error"),
    (700003, Remedy.REAUTHENTICATE, "needs_reauth"),
    (50107, Remedy.FIX_APP_REGISTRATION, "error"),
    (7000112, Remedy.FIX_APP_REGISTRATION, "error"),
    (50196, Remedy.RETRY, "ok"),
    (90033, Remedy.RETRY, "ok"),
    (90055, Remedy.RETRY, "ok"),
]


@pytest.mark.parametrize(("code", "remedy", "status"), EXPECTED, ids=[str(row[0]) for row in EXPECTED])
def test_it_gives_each_known_code_its_own_remedy_and_channel_status(
    code: int, remedy: Remedy, status: str
) -> None:
    explanation = explain(coded(code), context=CONTEXT)

    assert not is_fallback(explanation)
    assert (explanation.remedy, explanation.channel_status) == (remedy, status)


@pytest.mark.parametrize("code", [row[0] for row in EXPECTED])
def test_it_never_leaves_a_placeholder_unfilled(code: int) -> None:
    for context in ({}, CONTEXT):
        explanation = explain(coded(code), context=context)

        assert "{" not in explanation.title + explanation.cause + explanation.fix


def test_it_explains_a_redirect_uri_mismatch_with_the_uri_to_register() -> None:
    explanation = explain(coded(50011, "invalid_request"), context=CONTEXT)

    assert explanation.title == "The redirect URI is not registered"
    assert "add exactly https://helpdesk.example.com/auth/microsoft365/callback" in explanation.fix
    assert "Authentication" in explanation.fix


def test_it_names_the_app_by_client_id_in_entra_admin_center_steps() -> None:
    explanation = explain(coded(500113, "invalid_request"), context=CONTEXT)

    assert "the app with client ID 1b7e4c2a-8f3d-4e6b-9a01-5c2d7e8f9a0b" in explanation.fix


def test_it_points_to_the_postdesk_screen_when_no_redirect_uri_is_known() -> None:
    explanation = explain(coded(50011, "invalid_request"))

    assert "the redirect URI shown in Postdesk under Channels › Microsoft 365 app" in explanation.fix


def test_it_tells_the_admin_a_rejected_secret_is_usually_the_secret_id() -> None:
    explanation = explain(IdentityError.from_token_response(SECRET_ID_BODY))

    assert "Secret ID was pasted instead of the secret Value" in explanation.cause
    assert "Certificates & secrets → New client secret" in explanation.fix


def test_it_says_mailboxes_keep_working_after_an_expired_secret_is_replaced() -> None:
    explanation = explain(coded(7000222, "invalid_client"))

    assert explanation.title == "The client secret has expired"
    assert "Mailboxes do not need to sign in again" in explanation.fix


def test_it_sends_the_admin_to_the_admin_consent_link_when_consent_is_missing() -> None:
    explanation = explain(coded(65001), context=CONTEXT)

    assert explanation.remedy is Remedy.ADMIN_CONSENT
    assert CONTEXT["admin_consent_url"] in explanation.fix


def test_it_tells_a_single_tenant_app_to_stop_using_common() -> None:
    explanation = explain(coded(50194, "invalid_request"))

    assert "Directory (tenant) ID" in explanation.fix


@pytest.mark.parametrize("code", [70008, 700082, 50173, 70043, 70000])
def test_it_asks_for_a_new_sign_in_when_the_refresh_token_is_gone(code: int) -> None:
    explanation = explain(coded(code))

    assert (explanation.remedy, explanation.channel_status) == (Remedy.REAUTHENTICATE, "needs_reauth")
    assert "Re-authenticate" in explanation.fix


def test_it_mentions_the_ninety_day_inactivity_limit() -> None:
    assert "90 days" in explain(coded(700082)).cause


def test_it_explains_a_disabled_account_may_be_a_shared_mailbox() -> None:
    explanation = explain(coded(50057))

    assert "Shared mailboxes" in explanation.cause
    assert "Full Access" in explanation.fix


def test_it_names_the_missing_parameter_microsoft_reports() -> None:
    err = coded(900144, "invalid_request", "The request body must contain the following parameter: 'scope'.")

    assert "'scope'" in explain(err).cause


def test_it_explains_access_denied_without_a_code_as_a_cancelled_sign_in() -> None:
    explanation = explain(IdentityError.from_redirect({"error": "access_denied", "error_subcode": "cancel"}))

    assert explanation.title == "Sign-in was cancelled"
    assert explanation.remedy is Remedy.USER_ACTION


@pytest.mark.parametrize(
    ("error", "remedy"),
    [
        ("invalid_client", Remedy.FIX_APP_REGISTRATION),
        ("invalid_grant", Remedy.REAUTHENTICATE),
        ("interaction_required", Remedy.USER_ACTION),
        ("consent_required", Remedy.ADMIN_CONSENT),
        ("temporarily_unavailable", Remedy.RETRY),
        ("server_error", Remedy.RETRY),
        ("unauthorized_client", Remedy.FIX_APP_REGISTRATION),
    ],
)
def test_it_explains_an_oauth_error_without_a_code(error: str, remedy: Remedy) -> None:
    explanation = explain(IdentityError(error=error))

    assert not is_fallback(explanation)
    assert explanation.remedy is remedy


def test_it_explains_an_unknown_code_by_its_oauth_error_and_adds_the_lookup_page() -> None:
    explanation = explain(coded(123456, "invalid_grant"))

    assert explanation.remedy is Remedy.REAUTHENTICATE
    assert explanation.fix.endswith("look up 123456 at https://login.microsoftonline.com/error.")


def test_it_explains_by_code_before_the_oauth_error() -> None:
    assert explain(coded(7000215, "invalid_grant")).remedy is Remedy.FIX_APP_REGISTRATION


def test_it_falls_back_to_the_code_and_microsofts_lookup_page_for_an_unknown_code() -> None:
    explanation = explain(coded(123456, "invalid_request", "A brand new failure."))

    assert explanation.title == "Microsoft sign-in failed (AADSTS123456)"
    assert "A brand new failure." in explanation.cause
    assert "Trace ID" not in explanation.cause
    assert "Look up 123456 at https://login.microsoftonline.com/error" in explanation.fix
    assert "Trace ID and Correlation ID" in explanation.fix
    assert (explanation.remedy, explanation.transient) == (Remedy.CONTACT_SUPPORT, False)


def test_it_uses_the_clouds_login_host_for_the_lookup_page() -> None:
    explanation = explain(
        coded(123456, "invalid_request"), context={"login_url": "https://login.microsoftonline.us"}
    )

    assert "https://login.microsoftonline.us/error" in explanation.fix


def test_it_falls_back_for_an_unknown_oauth_error() -> None:
    explanation = explain(IdentityError(error="mystery_error"))

    assert explanation.title == "Microsoft sign-in failed (mystery_error)"


def test_it_does_not_read_access_denied_with_an_unknown_code_as_a_cancel() -> None:
    assert is_fallback(explain(coded(123456, "access_denied")))


# --- transient or not ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [50196, 90033, 90055, 50033, 90024, 90006])
def test_it_retries_service_outages_loops_and_throttling(code: int) -> None:
    assert is_transient(coded(code))


@pytest.mark.parametrize("error", ["temporarily_unavailable", "server_error"])
def test_it_retries_oauth_errors_that_mean_microsoft_is_busy(error: str) -> None:
    assert is_transient(IdentityError(error=error))


@pytest.mark.parametrize("code", [500133, 700024])
def test_it_does_not_retry_clock_skew_because_waiting_will_not_fix_a_wrong_clock(code: int) -> None:
    explanation = explain(coded(code))

    assert not explanation.transient
    assert "clock" in explanation.fix


def test_it_keeps_the_channel_ok_during_a_transient_error() -> None:
    assert explain(coded(90033)).channel_status == "ok"


@pytest.mark.parametrize("code", [row[0] for row in EXPECTED if row[1] is not Remedy.RETRY])
def test_it_does_not_retry_errors_that_need_a_person(code: int) -> None:
    assert not is_transient(coded(code))


# --- support reference -----------------------------------------------------------------------------


def test_it_formats_a_support_reference_with_code_ids_and_time() -> None:
    reference = support_reference(IdentityError.from_token_response(SECRET_ID_BODY))

    assert reference == f"AADSTS7000215 · Trace ID {TRACE_ID} · Correlation ID {CORRELATION_ID} · {TIMESTAMP}"


def test_it_uses_the_oauth_error_in_the_support_reference_when_there_is_no_code() -> None:
    assert support_reference(IdentityError(error="temporarily_unavailable")) == "temporarily_unavailable"


# --- untrusted input -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=10,
)
error_keys = st.sampled_from(
    ["error", "error_description", "error_codes", "trace_id", "correlation_id", "timestamp", "suberror"]
)
descriptions = st.builds(
    lambda code, rest: f"AADSTS{code}: {rest}",
    st.integers(min_value=0, max_value=10**12),
    st.text(),
)


@given(st.dictionaries(error_keys | st.text(), json_values | descriptions))
def test_it_never_raises_on_an_arbitrary_token_response(body: dict[str, object]) -> None:
    err = IdentityError.from_token_response(body)

    explanation = explain(err, context={"tenant": "{weird}"})

    assert isinstance(explanation, Explanation)
    assert isinstance(support_reference(err), str)
    assert isinstance(is_transient(err), bool)


@given(
    st.dictionaries(
        st.sampled_from(["error", "error_description", "error_subcode", "error_uri"]) | st.text(),
        st.text() | descriptions,
    )
)
def test_it_never_raises_on_arbitrary_callback_parameters(params: dict[str, str]) -> None:
    err = IdentityError.from_redirect(params)

    assert isinstance(explain(err), Explanation)
    assert isinstance(support_reference(err), str)
