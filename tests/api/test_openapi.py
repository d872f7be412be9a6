"""The OpenAPI document describes the REST API, and only the REST API."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_openapi_lists_every_api_v1_path_and_no_web_page(client: TestClient) -> None:
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert set(spec["paths"]) == {
        "/api/v1/me",
        "/api/v1/tickets",
        "/api/v1/tickets/{number}",
        "/api/v1/tickets/{number}/replies",
        "/api/v1/tickets/{number}/notes",
        "/api/v1/channels",
        "/api/v1/channels/{channel_id}",
        "/api/v1/quarantine",
        "/api/v1/quarantine/{message_id}/reprocess",
    }
    assert set(spec["paths"]["/api/v1/tickets"]) == {"get", "post"}
    assert set(spec["paths"]["/api/v1/tickets/{number}"]) == {"get", "patch"}


def test_openapi_declares_bearer_tokens_and_the_error_shape(client: TestClient) -> None:
    spec = client.get("/api/openapi.json").json()
    assert spec["components"]["securitySchemes"]["PersonalApiToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["PersonalApiToken"]["description"],
    }
    listing = spec["paths"]["/api/v1/tickets"]["get"]
    assert listing["security"] == [{"PersonalApiToken": []}]
    assert listing["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    channels = spec["paths"]["/api/v1/channels"]["get"]["responses"]
    assert "403" in channels
    # Every change can be refused to a read-only token: the schema says so.
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method != "get":
                assert "403" in operation["responses"], f"{method.upper()} {path} lacks its 403"
    assert spec["components"]["schemas"]["MeOut"]["properties"]["token_scope"]
    assert spec["components"]["schemas"]["TicketCreate"]["examples"]
