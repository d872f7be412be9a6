"""The "Test connection" button on a mailbox's page: the connection doctor, run by an admin."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from postdesk.doctor import diagnose, record
from postdesk.mail.compose import AddressError, check_address
from postdesk.web.deps import CurrentAdmin, RuntimeDep, SessionDep, channel_or_404
from postdesk.web.templating import render

router = APIRouter(include_in_schema=False)


@router.post("/channels/{channel_id}/doctor")
def test_connection(
    request: Request,
    channel_id: int,
    db: SessionDep,
    runtime: RuntimeDep,
    admin: CurrentAdmin,
    send_test_to: Annotated[str, Form(max_length=320)] = "",
) -> Response:
    """With htmx the result replaces the page's "Connection test" section; without, it is a page."""
    channel = channel_or_404(db, channel_id)
    context = {
        "section": "channels",
        "user": admin,
        "channel": channel,
        "send_test_to": send_test_to.strip(),
        # Without JavaScript the answer is a page of its own; with htmx only the section is swapped.
        "standalone": not request.headers.get("hx-request"),
    }
    address = None
    if send_test_to.strip():
        try:
            address = check_address(send_test_to)
        except AddressError as exc:
            return render(request, "channels/_doctor.html", {**context, "problem": str(exc)}, status_code=422)
    db.commit()  # end the read transaction: the checks take seconds and write on their own sessions
    diagnosis = diagnose(runtime, channel.id, send_test_to=address)
    record(runtime, diagnosis, actor_id=admin.id)
    return render(request, "channels/_doctor.html", {**context, "diagnosis": diagnosis})
