"""A scripted browser for the sandbox's sign-in pages: open a URL, press the button a person would."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import parse_qsl, urljoin, urlsplit

import httpx


class _Forms(HTMLParser):
    """Collects every form on a page as (action, fields)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append((attributes.get("action", ""), {}))
        elif tag == "input" and self.forms and "name" in attributes:
            self.forms[-1][1][attributes["name"]] = attributes.get("value", "")


class Browser:
    """Drives the sandbox pages the way a person would: open a URL, press a button."""

    def __init__(self, client: httpx.Client, *, redirect_uri: str) -> None:
        self.client = client
        self.redirect_uri = redirect_uri

    def open(self, url: str) -> httpx.Response:
        return self.client.get(url)

    def press(self, page: httpx.Response, **wanted: str) -> httpx.Response:
        """Submit the form on ``page`` whose fields include all of ``wanted``."""
        parser = _Forms()
        parser.feed(page.text)
        for action, fields in parser.forms:
            if all(fields.get(name) == value for name, value in wanted.items()):
                return self.client.post(urljoin(str(page.url), action), data=fields)
        raise AssertionError(f"no form with {wanted} on the page:\n{page.text}")

    def use_another_account(self, page: httpx.Response, upn: str) -> httpx.Response:
        """Type an address into the "Use another account" box instead of picking a listed account."""
        parser = _Forms()
        parser.feed(page.text)
        action, fields = next(
            (a, f) for a, f in parser.forms if f.keys() == {"flow", "login"} and not f["login"]
        )
        return self.client.post(urljoin(str(page.url), action), data={**fields, "login": upn})

    def sign_in(self, auth_uri: str, *, upn: str, consent: str | None = "accept") -> dict[str, str]:
        """Sign in as ``upn`` and answer the consent page if one comes; return the app's callback
        parameters."""
        page = self.press(self.open(auth_uri), login=upn)
        if page.status_code == 200 and consent is not None:
            page = self.press(page, decision=consent)
        return callback_parameters(page, self.redirect_uri)


def callback_parameters(response: httpx.Response, redirect_uri: str) -> dict[str, str]:
    """The query of the sandbox's redirect back to the app."""
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(redirect_uri), location
    return dict(parse_qsl(urlsplit(location).query))
