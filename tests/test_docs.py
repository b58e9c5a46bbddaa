"""README.md, CONTRIBUTING.md and docs/: every relative link resolves to a file of the repository,
and the README stays a front page."""

import glob
import os
import re

import pytest

from tests.conftest import ROOT

PAGES = [
    os.path.join(ROOT, 'README.md'),
    os.path.join(ROOT, 'CONTRIBUTING.md'),
    *sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md'))),
]
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


def relative_links(text):
    """The targets of the Markdown links in `text` that point into the repository (no URL, no
    mail address, no in-page anchor), without their #anchor."""
    targets = (m.group(1) for m in LINK.finditer(re.sub(r'```.*?```', '', text, flags=re.S)))
    return [
        t.split('#')[0] for t in targets if not re.match(r'[a-z]+:', t) and not t.startswith('#')
    ]


def test_the_link_reader_finds_relative_links_and_skips_urls_and_code():
    text = (
        '[a](docs/x.md#part) [b](https://x.org) [c](#here) [d](mailto:a@b)\n'
        '```\n[e](not/a/link.md)\n```\n[f](../LICENSE)'
    )
    assert relative_links(text) == ['docs/x.md', '../LICENSE']


@pytest.mark.parametrize('page', PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
    with open(page) as f:
        links = relative_links(f.read())
    folder = os.path.dirname(page)
    missing = [t for t in links if not os.path.exists(os.path.normpath(os.path.join(folder, t)))]
    assert missing == []


def test_the_readme_is_a_front_page_linking_every_docs_page():
    with open(os.path.join(ROOT, 'README.md')) as f:
        text = f.read()
    assert len(text.splitlines()) <= 200
    linked = {os.path.normpath(t) for t in relative_links(text)}
    pages = {os.path.relpath(p, ROOT) for p in PAGES[2:]}
    assert pages <= linked
