"""sanitise_html and html_to_text: one behaviour per test."""

from __future__ import annotations

import pytest

from postdesk.mail import html_to_text, sanitise_html
from tests.mail import parse_corpus


def _hostile_html() -> str:
    body_html = parse_corpus("hostile-html.eml").body_html
    assert body_html is not None
    return body_html


def test_it_removes_scripts_with_their_content() -> None:
    cleaned = sanitise_html(_hostile_html())
    assert "<script" not in cleaned
    assert "document.cookie" not in cleaned


def test_it_removes_event_handler_attributes() -> None:
    cleaned = sanitise_html(_hostile_html())
    assert "onerror" not in cleaned
    assert "onload" not in cleaned


def test_it_removes_javascript_links_also_when_written_with_entities() -> None:
    cleaned = sanitise_html(_hostile_html())
    assert "javascript" not in cleaned.lower()
    assert "alert('entity')" not in cleaned


def test_it_removes_data_links() -> None:
    assert "data:text/html" not in sanitise_html(_hostile_html())


def test_it_removes_svg_iframes_forms_and_style_sheets() -> None:
    cleaned = sanitise_html(_hostile_html())
    for gone in ("<svg", "<iframe", "<form", "<input", "<style", "<base", "<meta", "bg.png"):
        assert gone not in cleaned


def test_it_removes_css_expressions_but_keeps_harmless_styles() -> None:
    cleaned = sanitise_html(_hostile_html())
    assert "expression" not in cleaned
    assert '<p style="color:red">Please verify your account.</p>' in cleaned


def test_it_removes_css_urls() -> None:
    assert "url(" not in sanitise_html('<p style="background: url(https://t.example/x.png)">x</p>')


def test_it_blocks_remote_images_behind_a_placeholder_attribute() -> None:
    cleaned = sanitise_html(_hostile_html())
    assert 'data-remote-src="https://tracker.phish.example/open.gif?id=42"' in cleaned
    assert ' src="https://tracker' not in cleaned


def test_it_keeps_remote_images_when_allowed() -> None:
    cleaned = sanitise_html('<img src="https://cdn.example.com/logo.png">', allow_remote_images=True)
    assert cleaned == '<img src="https://cdn.example.com/logo.png">'


def test_it_keeps_cid_images_for_the_web_layer_to_rewrite() -> None:
    assert sanitise_html('<img src="cid:image001.png@01DA">') == '<img src="cid:image001.png@01DA">'


def test_it_keeps_inline_data_images_but_not_svg_ones() -> None:
    png = '<img src="data:image/png;base64,iVBORw0KGgo=">'
    assert sanitise_html(png) == png
    assert "data:" not in sanitise_html('<img src="data:image/svg+xml;base64,PHN2Zz4=">')


def test_it_opens_links_in_a_new_tab_without_referrer() -> None:
    cleaned = sanitise_html('<a href="https://contoso.com/help">Help</a>')
    assert cleaned == (
        '<a href="https://contoso.com/help" target="_blank" rel="noopener noreferrer nofollow">Help</a>'
    )


def test_it_removes_relative_links_that_would_point_at_postdesk_itself() -> None:
    assert "href" not in sanitise_html('<a href="/admin/users">x</a>')


def test_it_keeps_formatting_tables_and_lists() -> None:
    html = '<p><b>bold</b> <i>it</i></p><table><tbody><tr><td colspan="2">c</td></tr></tbody></table>'
    assert sanitise_html(html) == html


@pytest.mark.timeout(60)  # a guard against a hang, not a speed target
def test_it_shows_absurdly_nested_markup_as_text_instead_of_parsing_it_slowly() -> None:
    cleaned = sanitise_html("<div>" * 100_000 + "deep")
    assert cleaned.startswith("<pre>")
    assert "deep" in cleaned


def test_it_accepts_lone_surrogates() -> None:
    assert sanitise_html("a\udcffb") == "a\ufffdb"


def test_html_to_text_puts_blocks_on_their_own_lines() -> None:
    assert html_to_text("<div>one</div><div>two</div><p>three</p>four<br>five") == (
        "one\ntwo\n\nthree\n\nfour\nfive"
    )


def test_html_to_text_writes_links_with_their_address() -> None:
    assert html_to_text('See <a href="https://contoso.com/kb/42">the article</a>.') == (
        "See the article <https://contoso.com/kb/42>."
    )


def test_html_to_text_does_not_repeat_a_link_that_shows_its_address() -> None:
    assert html_to_text('<a href="mailto:joe@example.com">joe@example.com</a>') == "joe@example.com"


def test_html_to_text_decodes_entities() -> None:
    assert html_to_text("<p>1 &lt; 2 &amp;&amp; caf&eacute;&nbsp;ok</p>") == "1 < 2 && café ok"


def test_html_to_text_drops_scripts_styles_and_titles() -> None:
    assert html_to_text("<title>T</title><style>p{}</style><script>x()</script><p>text</p>") == "text"


def test_html_to_text_lists_items_with_dashes() -> None:
    assert html_to_text("<ul><li>one</li><li>two</li></ul>") == "- one\n- two"


def test_html_to_text_collapses_whitespace_outside_preformatted_text() -> None:
    assert html_to_text("<p>a   b\n\n c</p><pre>x\n  y</pre>") == "a b c\n\nx\ny"


@pytest.mark.parametrize("hostile", ["<a " * 100_000, "<!--" * 100_000, "<![" * 50_000, "<div>" * 100_000])
@pytest.mark.timeout(60)  # a guard against a hang, not a speed target
def test_html_to_text_does_not_hang_on_malformed_markup(hostile: str) -> None:
    # The stdlib HTMLParser alone needs minutes for some of these and raises on "<![".
    assert isinstance(html_to_text(hostile), str)
