"""Terminal escape injection (issue 22 item 7): free text is printable at the protocol (422 naming the field), and
whatever was stored before that rule reaches a terminal escaped, never raw."""

from __future__ import annotations

import psycopg
import pytest

from sync.protocol import escape_controls
from testkit import batches
from tests.central.support import bearer
from tests.central.test_cli import run

TITLE = "\x1b]0;owned\x07"  # sets the terminal's window title
HIDE = "0.1.0\x1b[2K\r\x1b[1A"  # erases the line, moves up: hides a row
BIDI = "0.1.0\u202e"  # right-to-left override: shows text reversed


@pytest.mark.parametrize("text", [TITLE, HIDE, BIDI, "line\nbreak", "tab\there"])
@pytest.mark.parametrize("field", [("agent_version",), ("summaries", 0, "model", "name"),
                                   ("events", 0, "model", "version")])
def test_free_text_with_control_characters_is_refused_naming_the_field(client, gateway, text, field):
    name, token = gateway
    batch = batches.batch(name)
    if field == ("agent_version",):
        batch["agent_version"] = text
    else:
        kind, _, _, key = field
        batch[kind][0]["model"] = {**batch[kind][0]["model"], key: text}
    response = client.post("/api/v1/ingest", json=batch, headers=bearer(token))
    assert response.status_code == 422, response.text
    assert [d["loc"] for d in response.json()["error"]["details"]] == [list(field)]
    assert response.json()["error"]["details"][0]["type"] == "printable_text"
    assert response.json()["error"]["details"][0]["msg"].startswith("must be printable text")


def test_printable_unicode_stays_accepted(client, gateway):
    name, token = gateway
    response = client.post("/api/v1/ingest", json=batches.batch(name, agent_version="0.1.0 (Müller-Straße, 工場)"),
                           headers=bearer(token))
    assert response.status_code == 200, response.text


def test_list_gateways_escapes_what_was_stored_before_the_rule(central_url, gateways):
    name, _ = gateways.add("escape")
    with psycopg.connect(central_url) as conn:
        conn.execute("UPDATE gateways SET agent_version = %s, last_seen_at = now() WHERE name = %s",
                     [TITLE + HIDE + BIDI, name])
    listed = run(central_url, "list-gateways")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(name))
    assert not any(ch in listed.stdout for ch in "\x1b\x07\r\u202e")
    assert row.endswith(escape_controls(TITLE + HIDE + BIDI)) and "\\x1b]0;owned\\x07" in row
    as_json = run(central_url, "list-gateways", "--json")
    assert "\x1b" not in as_json.stdout and "\\u001b]0;owned" in as_json.stdout

