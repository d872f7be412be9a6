"""CSRF protection by signed double-submit: a random seed in a cookie, an HMAC of it in every form.

A cross-site page can make the browser send the cookie but cannot read it, so it cannot compute the
form token. The seed is replaced at login and logout, which also defeats login CSRF and fixation.
"""

from __future__ import annotations

import secrets

from postdesk.security.crypto import SecretBox

CSRF_COOKIE = "postdesk_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


def new_seed() -> str:
    return secrets.token_urlsafe(32)


def token_for(box: SecretBox, seed: str) -> str:
    return box.sign(f"csrf:{seed}")


def token_is_valid(box: SecretBox, seed: str | None, token: str | None) -> bool:
    if not seed or not token:
        return False
    return box.verify(f"csrf:{seed}", token)
