"""The REST API under ``/api/v1``: personal bearer tokens, JSON in and out, documented by OpenAPI."""

from __future__ import annotations

from fastapi import APIRouter

from postdesk.web.api import articles, channels, me, quarantine, tickets

router = APIRouter(prefix="/api/v1")
for module in (me, tickets, articles, channels, quarantine):
    router.include_router(module.router)
