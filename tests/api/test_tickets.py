"""Tickets over the API: what a token's owner may see, filters and pages, creating and changing them."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from postdesk.db.models import Attachment, OutboundMessage, Role, Ticket, User
from postdesk.db.session import transaction
from postdesk.runtime import Runtime
from postdesk.storage import store_bytes
from postdesk.tickets.service import get_ticket
from tests.api.conftest import bearer, make_ticket, person, token_for

HOSTILE = '<p onclick="steal()">Hello <b>team</b></p><script>alert(1)</script>'


def _agent_in(runtime: Runtime, *groups: str, email: str = "ana@example.com") -> dict[str, str]:
    return bearer(token_for(runtime, person(runtime, email, groups=groups)))


# -- list ---------------------------------------------------------------------------------------


def test_the_list_pages_through_tickets_with_the_total(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    numbers = [make_ticket(db_runtime, f"Ticket {i}") for i in range(5)]
    first = api_client.get("/api/v1/tickets?per_page=2&sort=number&order=asc", headers=admin_headers).json()
    assert (first["total"], first["page"], first["per_page"], first["pages"]) == (5, 1, 2, 3)
    assert [t["number"] for t in first["items"]] == numbers[:2]
    last = api_client.get("/api/v1/tickets?per_page=2&page=3&sort=number&order=asc", headers=admin_headers)
    assert [t["number"] for t in last.json()["items"]] == numbers[4:]


def test_a_list_item_has_the_documented_fields(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    number = make_ticket(db_runtime, "Printer on fire", group="Support")
    [item] = api_client.get("/api/v1/tickets", headers=admin_headers).json()["items"]
    assert item["number"] == number
    assert item["title"] == "Printer on fire"
    assert item["customer"] == "jana.novak@example.org"
    assert (item["state"], item["group"], item["owner"], item["article_count"]) == ("new", "Support", None, 1)


def test_per_page_is_limited_to_100(api_client: TestClient, admin_headers: dict[str, str]) -> None:
    assert api_client.get("/api/v1/tickets?per_page=101", headers=admin_headers).status_code == 422
    assert api_client.get("/api/v1/tickets?page=0", headers=admin_headers).status_code == 422


def test_the_list_filters_by_state_group_owner_and_search(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    billing = make_ticket(db_runtime, "Invoice charged twice", group="Billing")
    support = make_ticket(db_runtime, "Printer on fire", group="Support", customer="max@example.net")
    api_client.patch(
        f"/api/v1/tickets/{support}", json={"state": "open", "owner": "me"}, headers=admin_headers
    )

    def numbers(query: str) -> list[int]:
        response = api_client.get(f"/api/v1/tickets?{query}", headers=admin_headers)
        assert response.status_code == 200, response.text
        return [t["number"] for t in response.json()["items"]]

    assert numbers("state=open") == [support]
    assert sorted(numbers("state=open&state=new")) == sorted([billing, support])
    assert numbers("group=Billing") == [billing]
    assert numbers("owner=me") == [support]
    assert numbers("owner=boss@example.com") == [support]
    assert numbers("q=invoice") == [billing]
    assert numbers("q=max@example") == [support]
    assert numbers(f"q=%23{billing}") == [billing]


def test_an_unknown_group_in_a_filter_is_an_error_not_an_empty_list(
    api_client: TestClient, admin_headers: dict[str, str]
) -> None:
    response = api_client.get("/api/v1/tickets?group=Bliling", headers=admin_headers)
    assert response.status_code == 422
    assert response.json() == {"detail": "There is no group named 'Bliling'."}


# -- visibility ---------------------------------------------------------------------------------


def test_an_agent_sees_only_their_groups_and_ungrouped_tickets(
    api_client: TestClient, db_runtime: Runtime
) -> None:
    own = make_ticket(db_runtime, "Invoice", group="Billing")
    ungrouped = make_ticket(db_runtime, "Hello")
    make_ticket(db_runtime, "Contract", group="Legal")
    headers = _agent_in(db_runtime, "Billing")
    listed = api_client.get("/api/v1/tickets", headers=headers).json()
    assert sorted(t["number"] for t in listed["items"]) == sorted([own, ungrouped])
    assert listed["total"] == 2


def test_another_groups_ticket_is_404_for_every_verb(api_client: TestClient, db_runtime: Runtime) -> None:
    hidden = make_ticket(db_runtime, "Contract", group="Legal")
    headers = _agent_in(db_runtime, "Billing")
    calls = [
        api_client.get(f"/api/v1/tickets/{hidden}", headers=headers),
        api_client.patch(f"/api/v1/tickets/{hidden}", json={"state": "closed"}, headers=headers),
        api_client.post(f"/api/v1/tickets/{hidden}/notes", json={"body": "peek"}, headers=headers),
        api_client.post(f"/api/v1/tickets/{hidden}/replies", json={"body": "peek"}, headers=headers),
    ]
    for response in calls:
        assert response.status_code == 404, response.text
        assert response.json() == {"detail": f"There is no ticket #{hidden}, or you cannot see it."}
    with db_runtime.sessions() as session:
        ticket = get_ticket(session, hidden)
        assert ticket is not None
        assert (ticket.state.value, len(ticket.articles)) == ("new", 1)


# -- get ----------------------------------------------------------------------------------------


def test_a_ticket_comes_with_its_articles_sanitised_html_and_attachments(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    number = make_ticket(db_runtime, "HTML mail", body_html=HOSTILE)
    with transaction(db_runtime.sessions) as session:
        ticket = get_ticket(session, number)
        assert ticket is not None
        session.add(
            Attachment(
                article_id=ticket.articles[0].id,
                filename="invoice.pdf",
                content_type="application/pdf",
                size=3,
                sha256=store_bytes(db_runtime.settings.attachments_dir, b"pdf"),
            )
        )
    response = api_client.get(f"/api/v1/tickets/{number}", headers=admin_headers)
    assert response.status_code == 200
    ticket_json = response.json()
    assert ticket_json["number"] == number
    [article] = ticket_json["articles"]
    assert article["direction"] == "inbound"
    assert article["internal"] is False
    assert article["body_text"] == "Body of HTML mail"
    assert "<b>team</b>" in article["body_html"]
    assert "<script" not in article["body_html"] and "onclick" not in article["body_html"]
    assert [a["filename"] for a in article["attachments"]] == ["invoice.pdf"]
    assert article["delivery"] is None


def test_an_unknown_ticket_is_404(api_client: TestClient, admin_headers: dict[str, str]) -> None:
    response = api_client.get("/api/v1/tickets/99999", headers=admin_headers)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"


# -- create -------------------------------------------------------------------------------------


def test_creating_a_ticket_files_the_customers_words_without_sending_mail(
    api_client: TestClient, db_runtime: Runtime
) -> None:
    agent = person(db_runtime, "ana@example.com", groups=("Billing",))
    response = api_client.post(
        "/api/v1/tickets",
        json={
            "customer_email": "Jana.Novak@Example.ORG",
            "customer_name": "Jana Novák",
            "title": "Phone call: invoice charged twice",
            "body": "Jana called: her card was charged twice.",
            "group": "Billing",
            "owner": "ana@example.com",
        },
        headers=bearer(token_for(db_runtime, agent)),
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["customer"] == "jana.novak@example.org"
    assert created["customer_name"] == "Jana Novák"
    assert (created["state"], created["group"], created["owner"]) == ("new", "Billing", "ana@example.com")
    [article] = created["articles"]
    assert (article["direction"], article["internal"]) == ("inbound", False)
    assert article["sender"] == "Jana Novák <jana.novak@example.org>"
    assert article["body_text"] == "Jana called: her card was charged twice."
    with db_runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutboundMessage)) == 0
        assert session.scalar(select(Ticket.number)) == created["number"]


def test_creating_a_ticket_with_an_unknown_owner_creates_nothing(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    response = api_client.post(
        "/api/v1/tickets",
        json={"customer_email": "c@example.org", "title": "T", "body": "B", "owner": "nobody@example.com"},
        headers=admin_headers,
    )
    assert response.status_code == 422
    assert response.json() == {"detail": "There is no agent with the address 'nobody@example.com'."}
    with db_runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Ticket)) == 0


def test_creating_a_ticket_refuses_a_bad_customer_address(
    api_client: TestClient, admin_headers: dict[str, str]
) -> None:
    response = api_client.post(
        "/api/v1/tickets",
        json={"customer_email": "not an address", "title": "T", "body": "B"},
        headers=admin_headers,
    )
    assert response.status_code == 422
    assert "customer_email" in response.json()["detail"]


def test_creating_a_ticket_without_a_title_is_a_validation_error(
    api_client: TestClient, admin_headers: dict[str, str]
) -> None:
    response = api_client.post(
        "/api/v1/tickets", json={"customer_email": "c@example.org", "body": "B"}, headers=admin_headers
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "title"]


# -- update -------------------------------------------------------------------------------------


def test_patch_changes_state_owner_and_group(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    number = make_ticket(db_runtime, "Printer on fire")
    person(db_runtime, "ana@example.com", groups=("Support",))
    response = api_client.patch(
        f"/api/v1/tickets/{number}",
        json={"state": "closed", "owner": "ana@example.com", "group": "Support"},
        headers=admin_headers,
    )
    assert response.status_code == 200, response.text
    changed = response.json()
    assert (changed["state"], changed["owner"], changed["group"]) == ("closed", "ana@example.com", "Support")
    assert changed["closed_at"] is not None


def test_patch_changes_only_the_fields_sent_and_null_clears(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    number = make_ticket(db_runtime, "Printer on fire", group="Support")
    api_client.patch(f"/api/v1/tickets/{number}", json={"owner": "me"}, headers=admin_headers)
    only_state = api_client.patch(f"/api/v1/tickets/{number}", json={"state": "open"}, headers=admin_headers)
    assert (only_state.json()["owner"], only_state.json()["group"]) == ("boss@example.com", "Support")
    cleared = api_client.patch(
        f"/api/v1/tickets/{number}", json={"owner": None, "group": None}, headers=admin_headers
    ).json()
    assert (cleared["state"], cleared["owner"], cleared["group"]) == ("open", None, None)


def test_patch_refuses_a_deactivated_owner_with_the_reason(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    number = make_ticket(db_runtime, "Printer on fire")
    gone = person(db_runtime, "gone@example.com")
    with transaction(db_runtime.sessions) as session:
        row = session.get(User, gone.id)
        assert row is not None
        row.is_active = False
    response = api_client.patch(
        f"/api/v1/tickets/{number}", json={"owner": "gone@example.com"}, headers=admin_headers
    )
    assert response.status_code == 422
    assert "deactivated" in response.json()["detail"]


def test_patch_refuses_a_null_state(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    number = make_ticket(db_runtime, "Printer on fire")
    response = api_client.patch(f"/api/v1/tickets/{number}", json={"state": None}, headers=admin_headers)
    assert response.status_code == 422


# -- notes --------------------------------------------------------------------------------------


def test_a_note_is_an_internal_article_by_the_tokens_owner(
    api_client: TestClient, db_runtime: Runtime
) -> None:
    number = make_ticket(db_runtime, "Printer on fire")
    headers = _agent_in(db_runtime, "Support")
    response = api_client.post(
        f"/api/v1/tickets/{number}/notes", json={"body": " Refund approved. "}, headers=headers
    )
    assert response.status_code == 201, response.text
    note = response.json()
    assert (note["direction"], note["internal"], note["author"]) == ("outbound", True, "ana@example.com")
    assert note["body_text"] == "Refund approved."
    assert note["delivery"] is None
    shown = api_client.get(f"/api/v1/tickets/{number}", headers=headers).json()
    assert [a["id"] for a in shown["articles"]][-1] == note["id"]


def test_an_empty_note_is_refused(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    number = make_ticket(db_runtime, "Printer on fire")
    response = api_client.post(f"/api/v1/tickets/{number}/notes", json={"body": "   "}, headers=admin_headers)
    assert response.status_code == 422
    assert response.json() == {"detail": "The note is empty."}


def test_an_admin_sees_every_group(api_client: TestClient, db_runtime: Runtime) -> None:
    hidden = make_ticket(db_runtime, "Contract", group="Legal")
    admin = person(db_runtime, "root@example.com", role=Role.ADMIN)
    response = api_client.get(f"/api/v1/tickets/{hidden}", headers=bearer(token_for(db_runtime, admin)))
    assert response.status_code == 200
