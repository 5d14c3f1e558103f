"""The dashboard's sign-in: no page or data without a session, the ops token exchanged for a cookie that scripts
cannot read and other sites cannot send, sessions that end at logout and at expiry, and CSRF refusals."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re

import pytest
from pydantic import SecretStr

from central import guard
from central.settings import Settings, SettingsError, load_settings
from testkit.central import OPS_TOKEN
from tests.central.support import OPS

SITE = "https://testserver"
SAME_SITE = {"Origin": SITE}
COOKIE = "__Host-pdm-session"
DATA = ("/api/v1/dashboard/fleet", "/api/v1/dashboard/gateways/gw/machines/m1", "/api/v1/fleet")


@pytest.fixture
def browser(make_client):
    """A client that talks https to the app, as a browser behind nginx does (so Secure cookies go back)."""
    client = make_client()
    client.base_url = SITE
    return client


def stored_digest(session_id: str, ops_token: str = OPS_TOKEN) -> bytes:
    return hmac.new(ops_token.encode(), session_id.encode(), hashlib.sha256).digest()


def sign_in(client, token: str = OPS_TOKEN, headers: dict | None = None):
    return client.post("/login", data={"token": token}, headers=SAME_SITE if headers is None else headers,
                       follow_redirects=False)


def test_no_page_and_no_data_without_a_session(browser):
    page = browser.get("/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login"
    for path in DATA:
        response = browser.get(path)
        assert response.status_code == 401, path
        assert "machines" not in response.text and "gateways" not in response.text
    form = browser.get("/login")
    assert form.status_code == 200 and 'name="token"' in form.text
    assert "script-src 'none'" in form.headers["content-security-policy"]


def test_a_forged_or_stale_cookie_gets_nothing(browser):
    browser.cookies.set(COOKIE, "x" * 43)
    assert browser.get("/", follow_redirects=False).status_code == 303
    assert browser.get("/api/v1/dashboard/fleet").status_code == 401


def test_a_wrong_token_is_refused_without_a_cookie(browser):
    for token in ("wrong", OPS_TOKEN + "x", OPS_TOKEN[:-1], ""):
        response = sign_in(browser, token)
        assert response.status_code == 401, token
        assert "set-cookie" not in response.headers
        assert "That token was refused." in response.text
    assert browser.get("/api/v1/dashboard/fleet").status_code == 401


def test_sign_in_gives_a_secure_httponly_strict_session_cookie(browser, conn):
    response = sign_in(browser)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    session_id = re.match(rf"{COOKIE}=([^;]+);", cookie)[1]
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"secure", "httponly", "samesite=strict", "path=/", "max-age=28800"} <= flags, cookie
    assert not any(flag.startswith("domain") for flag in flags)
    assert OPS_TOKEN not in cookie and len(session_id) >= 43
    # Only a digest is stored: the database does not hold what a browser could present.
    stored = conn.execute("SELECT id_hash FROM dashboard_sessions WHERE id_hash = %s",
                          [stored_digest(session_id)]).fetchone()
    assert stored is not None
    assert conn.execute("SELECT count(*) FROM dashboard_sessions WHERE id_hash::text LIKE %s",
                        [f"%{session_id}%"]).fetchone()[0] == 0

    page = browser.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+';", csp) and "unsafe" not in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    assert OPS_TOKEN not in page.text
    for path in ("/api/v1/dashboard/fleet", "/api/v1/fleet", "/api/v1/machines"):
        assert browser.get(path).status_code == 200, path


def test_logout_ends_the_session_on_the_server(browser):
    assert sign_in(browser).status_code == 303
    session_id = browser.cookies.get(COOKIE)
    response = browser.post("/logout", headers=SAME_SITE, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert re.search(rf"{COOKIE}=\"?\"?;.*max-age=0", response.headers["set-cookie"], re.IGNORECASE)
    browser.cookies.clear()
    browser.cookies.set(COOKIE, session_id)  # a copy of the cookie taken before the logout
    assert browser.get("/api/v1/dashboard/fleet").status_code == 401
    assert browser.get("/", follow_redirects=False).status_code == 303


def test_an_expired_session_is_refused(browser, conn):
    sign_in(browser)
    digest = stored_digest(browser.cookies.get(COOKIE))
    conn.execute("UPDATE dashboard_sessions SET expires_at = now() - interval '1 second' WHERE id_hash = %s",
                 [digest])
    assert browser.get("/api/v1/dashboard/fleet").status_code == 401


@pytest.mark.parametrize("headers", [{}, {"Origin": "https://evil.example"}, {"Origin": "http://testserver"},
                                     {"Origin": "null"}, {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
                                     {"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"}])
def test_sign_in_and_out_refuse_other_origins(browser, headers):
    response = sign_in(browser, headers=headers)
    assert response.status_code == 403 and "set-cookie" not in response.headers
    sign_in(browser)
    assert browser.post("/logout", headers=headers, follow_redirects=False).status_code == 403
    assert browser.get("/api/v1/dashboard/fleet").status_code == 200  # still signed in


def test_a_tls_proxy_not_trusted_is_named_when_the_schemes_differ(make_client):
    client = make_client()  # plain http to the app, as behind nginx without PDM_CENTRAL_TRUSTED_PROXIES
    response = sign_in(client)
    assert response.status_code == 403 and "PDM_CENTRAL_TRUSTED_PROXIES" in response.json()["error"]["message"]


def test_the_origin_port_is_compared_when_the_host_header_has_one(browser):
    # nginx passes `Host: $host`, without the port the browser used
    assert sign_in(browser, headers={"Origin": f"{SITE}:8443", "Host": "testserver"}).status_code == 303
    assert sign_in(browser, headers={"Origin": f"{SITE}:8443", "Host": "testserver:443"}).status_code == 403
    assert sign_in(browser, headers={"Origin": f"{SITE}:443", "Host": "testserver:443"}).status_code == 303
    assert sign_in(browser, headers={"Origin": "https://testserver.evil.example", "Host": "testserver"}).status_code \
        == 403


def test_a_browser_that_sends_no_origin_is_judged_by_sec_fetch_site(browser):
    assert sign_in(browser, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 303
    assert browser.post("/logout", headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"},
                        follow_redirects=False).status_code == 303


def test_ops_endpoints_keep_taking_the_bearer_token(browser):
    assert browser.get("/api/v1/dashboard/fleet", headers=OPS).status_code == 200
    assert browser.get("/api/v1/fleet", headers=OPS).status_code == 200
    sign_in(browser)
    # A wrong bearer token is not rescued by a valid cookie: the header says who is asking.
    assert browser.get("/api/v1/fleet", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_plain_http_cookie_for_loopback_development_only(make_client):
    client = make_client(session_cookie_secure=False)
    response = client.post("/login", data={"token": OPS_TOKEN}, headers={"Origin": "http://testserver"},
                           follow_redirects=False)
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("pdm-session=") and "secure" not in cookie.lower() and "httponly" in cookie.lower()
    assert client.get("/api/v1/dashboard/fleet").status_code == 200


def test_an_insecure_cookie_is_refused_in_production_and_off_loopback():
    strong = {"ops_token": OPS_TOKEN, "database_url": "postgresql://db/pdm", "sources": {"database_url": "file"}}
    production = Settings(mode="production", session_cookie_secure=False, **strong)
    assert any("SESSION_COOKIE_SECURE" in p and "production" in p for p in production.serving_problems())
    assert Settings(mode="production", **strong).serving_problems() == []
    exposed = Settings(session_cookie_secure=False, bind="0.0.0.0:8000")
    assert any("loopback" in p for p in exposed.serving_problems())
    assert Settings(session_cookie_secure=False, bind="localhost:8000").serving_problems() == []
    loaded = load_settings({"PDM_CENTRAL_SESSION_LIFETIME_S": "600", "PDM_CENTRAL_SESSION_COOKIE_SECURE": "false"})
    assert loaded.session_lifetime_s == 600 and not loaded.session_cookie_secure
    with pytest.raises(SettingsError, match="SESSION_LIFETIME_S"):
        load_settings({"PDM_CENTRAL_SESSION_LIFETIME_S": "5"})


def test_a_new_ops_token_ends_every_session(browser, make_client):
    """Issue 22 item 9: rotating the ops token (after a leak) must lock out whoever signed in with the old one."""
    sign_in(browser)
    session_id = browser.cookies.get(COOKIE)
    assert browser.get("/api/v1/dashboard/fleet").status_code == 200
    rotated = make_client(ops_token=SecretStr("ops-Zr4Kq8Vx2Nc6Bm1Tj9Wf5Hs3Ld7Pg0Ye"))
    rotated.base_url = SITE
    rotated.cookies.set(COOKIE, session_id)
    assert rotated.get("/api/v1/dashboard/fleet").status_code == 401
    assert rotated.get("/", follow_redirects=False).status_code == 303


def test_refused_sign_ins_are_limited_and_logged_per_address(make_client, caplog):
    """Issue 22 item 9: ~1,500 guesses a second were possible; now MAX_FAILURES a window, then 429 with
    Retry-After (the right token included, not even checked), one warning line naming the address, never a token."""
    browser = make_client(peer="192.0.2.31")
    browser.base_url = SITE
    with caplog.at_level(logging.WARNING, logger="pdm.auth"):
        for i in range(guard.MAX_FAILURES):
            assert sign_in(browser, f"guess-{i}").status_code == 401
        throttled = sign_in(browser)
    assert throttled.status_code == 429 and 1 <= int(throttled.headers["retry-after"]) <= guard.WINDOW_S + 1
    assert "set-cookie" not in throttled.headers and "Too many refused sign-ins" in throttled.text
    refusals = [r.getMessage() for r in caplog.records if "dashboard sign-in" in r.getMessage()]
    assert refusals == ["refused dashboard sign-in from 192.0.2.31"]
    assert not any("guess-" in r.getMessage() or OPS_TOKEN in r.getMessage() for r in caplog.records)
    other = make_client(peer="192.0.2.32")  # another address is not held back
    other.base_url = SITE
    assert sign_in(other).status_code == 303

