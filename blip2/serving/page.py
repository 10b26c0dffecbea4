"""The page ``GET /`` serves, to try the model in a browser (``page.html`` beside this file).

It is one self-contained file: inline style and script, no CDN, no web fonts. :data:`CONTENT_SECURITY_POLICY`
goes with it so that a browser refuses anything from another host, even by mistake; images are read
from the user's disk as ``data:`` URLs and the page talks only to the server it came from.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'")


@cache
def page_html() -> str:
    return resources.files("blip2.serving").joinpath("page.html").read_text(encoding="utf-8")
