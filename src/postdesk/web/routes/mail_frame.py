"""The body of one HTML mail as a document of its own, shown in a sandboxed frame of the ticket view.

Mail HTML is the most hostile content a help desk shows. ``sanitise_html`` removes scripts, handlers,
forms and remote images; showing what is left in a separate document adds a second wall in case the
sanitiser ever misses something. The frame is sandboxed (no script, no forms, an opaque origin that
cannot read Postdesk's pages or cookies), and this response carries its own Content-Security-Policy
that loads no script and no remote content, so the mail's inline styles (allowed here, and only here)
cannot reach the agent's session either. Links open in a new, unsandboxed tab.
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse

from postdesk.mail import sanitise_html
from postdesk.tickets.service import get_ticket
from postdesk.web.deps import CurrentUser, SessionDep

router = APIRouter(include_in_schema=False)

FRAME_SANDBOX = "allow-popups allow-popups-to-escape-sandbox"
# Only the frame's own stylesheet and the mail's style attributes: the sanitiser has already reduced
# those to a short list of properties without url() or expression().
_STYLE = (
    "body{margin:0;padding:.25rem;color:#1d2330;font:15px/1.5 system-ui,-apple-system,'Segoe UI',"
    "Roboto,sans-serif;overflow-wrap:anywhere}img{max-width:100%;height:auto}"
    "img[data-remote-src]{display:inline-block;min-width:1rem;min-height:1rem;background:#eef1f6}"
    "blockquote{margin:.5rem 0;padding-left:.75rem;border-left:3px solid #dfe3ea;color:#5d6677}"
    "pre{white-space:pre-wrap}"
)


def frame_policy(*, remote_images: bool) -> str:
    """The frame's CSP. Remote images load only once the agent asks, so a tracking pixel the sanitiser
    missed (it moves every remote ``src`` aside) is still blocked by the browser until then."""
    images = "data: https:" if remote_images else "data:"
    return (
        f"default-src 'none'; img-src {images}; style-src 'unsafe-inline'; base-uri 'none'; "
        f"form-action 'none'; frame-ancestors 'self'; sandbox {FRAME_SANDBOX}"
    )


@router.get("/tickets/{number}/articles/{article_id}/body")
def article_body(
    number: int, article_id: int, db: SessionDep, user: CurrentUser, images: bool = False
) -> HTMLResponse:
    """The sanitised HTML of one article; ``?images=1`` after the agent clicks "Show remote images"."""
    # The same visibility check as the ticket page: another group's mail answers 404, like no mail.
    ticket = get_ticket(db, number, viewer=user)
    article = next((a for a in ticket.articles if a.id == article_id), None) if ticket else None
    if ticket is None or article is None or not article.body_html:
        raise HTTPException(status_code=404, detail="There is no such message, or you cannot see it.")
    body = sanitise_html(article.body_html, allow_remote_images=images)
    document = (
        '<!doctype html><html><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
        f"<title>{escape(article.subject or ticket.title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )
    return HTMLResponse(
        document,
        headers={
            "Content-Security-Policy": frame_policy(remote_images=images),
            "X-Frame-Options": "SAMEORIGIN",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "private, no-store",
        },
    )
