"""The HTTP hardening both servers share (web.http): headers on every response, the page's CSP by hash."""

from __future__ import annotations

import base64
import hashlib

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.testclient import TestClient

from web.http import SECURITY_HEADERS, SecurityHeaders, error_body, load_page

PAGE = "<!doctype html><style>p{color:red}</style><p>hi</p><script>document.title='x'</script>"


def client(hsts: bool, base_url: str = "http://testserver") -> TestClient:
    api = FastAPI()

    @api.get("/json")
    def json_route() -> JSONResponse:
        return JSONResponse({"a": 1})

    @api.get("/page")
    def page_route() -> HTMLResponse:
        return HTMLResponse("<p>page</p>", headers={"Content-Security-Policy": "default-src 'self'"})

    return TestClient(SecurityHeaders(api, hsts=hsts), base_url=base_url)


def test_every_response_carries_the_security_headers_and_a_route_keeps_its_own():
    with client(hsts=False) as http:
        for response in (http.get("/json"), http.get("/missing")):
            for name, value in SECURITY_HEADERS:
                assert response.headers[name.decode()] == value.decode()
        page = http.get("/page")
        assert page.headers.get_list("content-security-policy") == ["default-src 'self'"]
        assert page.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(("hsts", "base_url", "expected"), [
    (True, "https://testserver", True), (True, "http://testserver", False), (False, "https://testserver", False)])
def test_hsts_only_when_asked_for_and_over_https(hsts, base_url, expected):
    with client(hsts, base_url) as http:
        assert ("strict-transport-security" in http.get("/json").headers) is expected


def sha256_source(text: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


def a_package(tmp_path, monkeypatch, name: str, html: str) -> str:
    package = tmp_path / name
    (package / "static").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "static" / "page.html").write_text(html)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_page_runs_its_own_inline_script_and_style_and_nothing_else(tmp_path, monkeypatch):
    page = load_page(a_package(tmp_path, monkeypatch, "goodpages", PAGE), "static/page.html")
    assert page.html == PAGE.encode()
    csp = page.csp(form_action="'self'")
    assert f"script-src {sha256_source(page.script)};" in csp and page.script == "document.title='x'"
    assert f"style-src {sha256_source('p{color:red}')};" in csp
    assert "default-src 'none'" in csp and "form-action 'self'" in csp and "unsafe" not in csp


def test_a_page_with_a_second_script_is_refused_naming_the_file(tmp_path, monkeypatch):
    package = a_package(tmp_path, monkeypatch, "badpages", PAGE + "<script>alert(1)</script>")
    with pytest.raises(RuntimeError, match=r"badpages/static/page.html must hold exactly one inline <script>, not 2"):
        load_page(package, "static/page.html")


def test_the_error_envelope_passes_details_as_given():
    assert error_body("not_found", "no such machine") == {"error": {"code": "not_found", "message": "no such machine"}}
    details = [{"loc": ["query", "limit"], "msg": "too big", "type": "less_than_equal", "input": None}]
    assert error_body("invalid_request", "bad", details)["error"]["details"] == details
