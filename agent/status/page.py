"""The technician's page (agent/static/status.html): one offline document, served with the Content-Security-Policy
that allows its one inline <script> and <style> by their sha256 (web/http.py) and nothing else."""

from __future__ import annotations

from web.http import load_page


def page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy."""
    loaded = load_page("agent", "static/status.html")
    return loaded.html, loaded.csp()
