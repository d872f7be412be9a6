"""Adding a mailbox app-only from the Channels page: the form posts here with the address and the
transport (Graph, or IMAP and SMTP), Postdesk checks the app's access that way and either adds the mailbox
or shows what to grant and the PowerShell to run."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from postdesk.db.models import Transport
from postdesk.microsoft.app_only import AppOnlyOutcome, add_app_only_mailbox
from postdesk.web.deps import CurrentAdmin, RuntimeDep, SessionDep
from postdesk.web.templating import render

router = APIRouter(include_in_schema=False)


@router.post("/channels/app-only")
def add_app_only(
    request: Request,
    db: SessionDep,
    runtime: RuntimeDep,
    admin: CurrentAdmin,
    address: Annotated[str, Form(max_length=320)],
    transport: Annotated[str, Form(max_length=10)] = Transport.GRAPH.value,
) -> Response:
    """With htmx the result replaces the page's "App-only mailbox" section; without, it is a page."""
    db.commit()  # end the read transaction: the check asks Microsoft and writes on its own session
    if transport in {choice.value for choice in Transport}:
        outcome = add_app_only_mailbox(runtime, address, transport=Transport(transport))
    else:
        outcome = AppOnlyOutcome(address=address, problem="Choose Microsoft Graph or IMAP and SMTP.")
    context = {
        "section": "channels",
        "user": admin,
        "registration": True,
        "app_only": outcome,
        "standalone": not request.headers.get("hx-request"),
    }
    return render(request, "channels/_app_only.html", context, status_code=200 if outcome.ok else 422)
