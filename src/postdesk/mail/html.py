"""HTML from mail: sanitised for display in the agent UI, or turned into readable plain text.

Both functions run nh3 (the Rust html5ever parser with the ammonia sanitiser) first. Its output is
well-formed, which matters for ``html_to_text``: the stdlib ``HTMLParser`` takes quadratic time (and
can raise AssertionError) on malformed markup such as thousands of unclosed ``<a `` tags, so it only ever
sees nh3's output. html5ever in turn slows down quadratically with the depth of open elements, so markup
nested deeper than any real message is reduced to its text before it reaches nh3.
"""

from __future__ import annotations

import html as html_entities
import re
from html.parser import HTMLParser

import nh3

# Conservative: text formatting, lists, tables and images; nothing that runs code, loads a document,
# submits data or changes the page around the message.
_ALLOWED_TAGS = frozenset(
    {
        "a", "abbr", "b", "bdi", "bdo", "blockquote", "br", "caption", "center", "cite", "code", "col",
        "colgroup", "dd", "del", "div", "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
        "i", "img", "ins", "kbd", "li", "mark", "ol", "p", "pre", "q", "s", "samp", "small", "span",
        "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "u",
        "ul",
    }
)  # fmt: skip
# Removed together with their content: their text is code, metadata or a foreign document.
_DROPPED_WITH_CONTENT = frozenset(
    {"script", "style", "title", "template", "noscript", "iframe", "object", "embed", "svg", "math",
     "applet", "frameset", "noembed", "noframes", "xmp", "textarea", "select"}
)  # fmt: skip
_TABLE_ATTRIBUTES = {"align", "valign", "width", "height", "bgcolor", "colspan", "rowspan", "border"}
_ALLOWED_ATTRIBUTES: dict[str, set[str]] = {
    "*": {"style", "dir", "lang", "title", "align"},
    "a": {"href"},
    "img": {"src", "alt", "width", "height"},
    "font": {"color", "face", "size"},
    "table": _TABLE_ATTRIBUTES | {"cellpadding", "cellspacing"},
    "td": _TABLE_ATTRIBUTES,
    "th": _TABLE_ATTRIBUTES,
    "tr": _TABLE_ATTRIBUTES,
    "col": {"span", "width"},
    "colgroup": {"span", "width"},
    "ol": {"start", "type"},
    "ul": {"type"},
}
_URL_SCHEMES = frozenset({"http", "https", "mailto", "tel", "cid", "data"})
_LINK_REL = "noopener noreferrer nofollow"
# nh3 can only change an attribute's value, so a blocked remote image is first marked with this scheme
# and the mark is then turned into the ``data-remote-src`` attribute the web layer looks for.
_REMOTE_MARK = "x-postdesk-remote:"
_REMOTE_IMG = re.compile(r'(<img\b[^<>]*?) src="x-postdesk-remote:([^"]*)"')
_INLINE_IMAGE_DATA = re.compile(r"data:image/(?:png|jpeg|jpg|gif|webp|bmp);", re.IGNORECASE)
_STYLE_PROPERTIES = frozenset(
    {
        "background-color", "border", "border-bottom", "border-collapse", "border-color", "border-left",
        "border-right", "border-style", "border-top", "border-width", "color", "font", "font-family",
        "font-size", "font-style", "font-weight", "height", "line-height", "list-style-type", "margin",
        "margin-bottom", "margin-left", "margin-right", "margin-top", "padding", "padding-bottom",
        "padding-left", "padding-right", "padding-top", "text-align", "text-decoration", "text-indent",
        "vertical-align", "white-space", "width",
    }
)  # fmt: skip
# Values may not call functions (expression(), url()) or use escapes that hide one; rgb() is harmless.
_SAFE_STYLE_VALUE = re.compile(r"(?:[\w\s#.,%'\"!+-]|rgba?\([\d\s.,%]*\))*", re.ASCII)
_MAX_NESTING = 1000
_TAG = re.compile(r"<(/?)([A-Za-z][^\s/<>]*)")
# Elements html5ever closes on its own or that never open: they do not deepen the stack of open elements.
_NOT_NESTING = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
     "track", "wbr", "p", "li", "td", "th", "tr", "dt", "dd", "option", "optgroup", "thead", "tbody",
     "tfoot", "colgroup", "caption", "rt", "rp", "html", "head", "body"}
)  # fmt: skip
_ANY_TAG = re.compile(r"<[^<>]*>")
_SURROGATES = re.compile(r"[\ud800-\udfff]")


def sanitise_html(html: str, *, allow_remote_images: bool = False) -> str:
    """Return ``html`` reduced to safe formatting, for display inside the agent UI.

    Links open in a new tab without a referrer; remote images keep their URL in ``data-remote-src``
    (instead of ``src``) unless ``allow_remote_images``, so opening a ticket does not tell a tracker
    that the mail was read; ``cid:`` images are left for the web layer to rewrite.
    """
    html = _SURROGATES.sub("\ufffd", html)
    if _too_deeply_nested(html):
        return f"<pre>{html_entities.escape(_strip_tags(html))}</pre>"

    def keep_attribute(tag: str, attribute: str, value: str) -> str | None:
        return _filter_attribute(tag, attribute, value, allow_remote_images=allow_remote_images)

    cleaned = nh3.clean(
        html,
        tags=set(_ALLOWED_TAGS),
        clean_content_tags=set(_DROPPED_WITH_CONTENT),
        attributes=_ALLOWED_ATTRIBUTES,
        attribute_filter=keep_attribute,
        url_schemes=set(_URL_SCHEMES),
        # A relative URL in a mail would resolve against Postdesk itself.
        url_relative="deny",
        link_rel=_LINK_REL,
        set_tag_attribute_values={"a": {"target": "_blank"}},
    )
    return _REMOTE_IMG.sub(r'\1 data-remote-src="\2"', cleaned)


def _filter_attribute(tag: str, attribute: str, value: str, *, allow_remote_images: bool) -> str | None:
    if attribute == "style":
        return _filter_style(value)
    if attribute == "href":
        # data: and cid: are allowed schemes only for images; a data: link can carry a whole page.
        return None if value.lower().startswith(("data:", "cid:")) else value
    if tag == "img" and attribute == "src":
        return _filter_image_source(value, allow_remote_images=allow_remote_images)
    return value


def _filter_image_source(value: str, *, allow_remote_images: bool) -> str | None:
    lowered = value.lower()
    if lowered.startswith("data:"):
        # SVG is left out on purpose: it is a document that can carry script.
        return value if _INLINE_IMAGE_DATA.match(value) else None
    if lowered.startswith(("http:", "https:")):
        return value if allow_remote_images else _REMOTE_MARK + value
    return value if lowered.startswith("cid:") else None


def _filter_style(value: str) -> str | None:
    kept = []
    for declaration in value.split(";"):
        name, colon, setting = declaration.partition(":")
        name, setting = name.strip().lower(), setting.strip()
        if colon and name in _STYLE_PROPERTIES and _SAFE_STYLE_VALUE.fullmatch(setting):
            kept.append(f"{name}:{setting}")
    return ";".join(kept) or None


def _too_deeply_nested(html: str) -> bool:
    # Counts open elements by name, so a stray end tag cannot pretend to close something else.
    open_elements: dict[str, int] = {}
    depth = 0
    for match in _TAG.finditer(html):
        name = match.group(2).lower()
        if name in _NOT_NESTING:
            continue
        if not match.group(1):
            open_elements[name] = open_elements.get(name, 0) + 1
            depth += 1
            if depth > _MAX_NESTING:
                return True
        elif open_elements.get(name, 0) > 0:
            open_elements[name] -= 1
            depth -= 1
    return False


def _strip_tags(html: str) -> str:
    # [^<>] keeps this linear: a run of "<" without ">" is scanned once, not once per "<".
    return html_entities.unescape(_ANY_TAG.sub(" ", html))


def html_to_text(html: str) -> str:
    """Return readable plain text: blocks on their own lines, links as ``text <url>``, no tags."""
    html = _SURROGATES.sub("\ufffd", html)
    if _too_deeply_nested(html):
        return _tidy_lines(_strip_tags(html))
    wellformed = nh3.clean(
        html,
        tags=set(_ALLOWED_TAGS),
        clean_content_tags=set(_DROPPED_WITH_CONTENT),
        attributes={"a": {"href"}},
        url_schemes={"http", "https", "mailto"},
        link_rel=None,
    )
    converter = _TextConverter()
    try:
        converter.feed(wellformed)
        converter.close()
    except AssertionError:  # HTMLParser's own consistency checks; nh3's output should never trip them
        return _tidy_lines(_strip_tags(wellformed))
    return _tidy_lines("".join(converter.chunks))


_BLOCKS = frozenset(
    {"blockquote", "caption", "center", "div", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
     "ol", "p", "pre", "table", "tr", "ul"}
)  # fmt: skip
_PARAGRAPHS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table", "pre"})
_SPACES = re.compile(r"[ \t\r\n\f\v\u00a0]+")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


class _TextConverter(HTMLParser):
    """Collects text; block boundaries become pending line breaks, so nested blocks add no blank lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._pending_breaks = 0
        self._preformatted = 0
        self._links: list[tuple[str | None, int]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self._write("\n")
        elif tag == "hr":
            self._block(1)
            self._write("----")
            self._block(1)
        elif tag == "li":
            self._block(1)
            self._write("- ")
        elif tag in {"td", "th"}:
            self._write(" ")
        elif tag == "a":
            self._links.append((dict(attrs).get("href"), len(self.chunks)))
        elif tag in _BLOCKS:
            self._block(2 if tag in _PARAGRAPHS else 1)
        if tag == "pre":
            self._preformatted += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._links:
            self._close_link(*self._links.pop())
        elif tag in _BLOCKS:
            self._block(2 if tag in _PARAGRAPHS else 1)
        if tag == "pre" and self._preformatted:
            self._preformatted -= 1

    def handle_data(self, data: str) -> None:
        text = data if self._preformatted else _SPACES.sub(" ", data)
        if text.strip() or self._preformatted:
            self._write(text)
        elif text and not self._pending_breaks:
            self.chunks.append(" ")

    def _block(self, lines: int) -> None:
        if self.chunks:
            self._pending_breaks = max(self._pending_breaks, lines)

    def _write(self, text: str) -> None:
        if self._pending_breaks:
            self.chunks.append("\n" * self._pending_breaks)
            self._pending_breaks = 0
        self.chunks.append(text)

    def _close_link(self, href: str | None, start: int) -> None:
        if not href:
            return
        text = "".join(self.chunks[start:]).strip()
        target = href.removeprefix("mailto:")
        # A link whose text already is its address would only repeat itself; a link without text
        # is just its address (angle brackets around it alone would read like markup).
        if not text:
            self._write(target)
        elif text not in {href, target}:
            self._write(f" <{target}>")


def _tidy_lines(text: str) -> str:
    lines = (line.strip(" \t\u00a0") for line in text.replace("\r\n", "\n").split("\n"))
    return _MANY_BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")
