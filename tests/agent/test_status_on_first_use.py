"""The status API's app is made at the first request that needs it (agent/status/server.py, `OnFirstUse`): a
liveness probe alone does not make it and gets what the app answers; everything else works from the first request."""

from __future__ import annotations

import logging

import agent.status.routes
from tests.agent.test_status import SECURITY, TOKEN, error_of, serving

IGNORED = {"date"}  # differs between any two responses


def test_a_probe_alone_does_not_make_the_app_and_gets_what_the_app_answers(tmp_path):
    with serving(tmp_path) as served:
        app = served.server.app
        assert app is not None and not app.loaded
        before = served.get("/healthz")
        head = served.get("/healthz", method="HEAD")
        error_of(served.get("/healthz", headers={"Host": "attacker.example"}), 400, "bad_host")  # the same guard
        assert not app.loaded
        assert before.status_code == head.status_code == 200
        assert before.json() == {"status": "ok", "checks": {}}
        assert all(before.headers[name] == value for name, value in SECURITY.items())

        assert served.get("/api/v1/status").status_code == 200  # the first request that needs it makes it
        assert app.loaded
        after = served.get("/healthz")
        assert after.content == before.content
        assert ({k: v for k, v in after.headers.items() if k.lower() not in IGNORED}
                == {k: v for k, v in before.headers.items() if k.lower() not in IGNORED})
        assert served.get("/healthz", method="HEAD").headers.keys() == head.headers.keys()


def test_with_a_token_the_probe_stays_open_and_the_rest_needs_it_from_the_first_request(tmp_path):
    with serving(tmp_path, status={"token": TOKEN}) as served:
        assert served.get("/healthz").status_code == 200
        assert not served.server.app.loaded
        error_of(served.get("/api/v1/machines"), 401, "unauthorized")
        assert served.get("/api/v1/machines", token=TOKEN).status_code == 200
        assert served.get("/", token=None).status_code == 200


def test_an_app_that_cannot_be_made_is_a_json_500_with_the_headers_and_is_tried_again(tmp_path, monkeypatch,
                                                                                       caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom in create_app")

    monkeypatch.setattr(agent.status.routes, "create_app", broken)
    with serving(tmp_path) as served, caplog.at_level(logging.ERROR, "agent.status"):
        response = served.get("/api/v1/status")
        error = error_of(response, 500, "internal")
        assert "boom" not in error["message"]
        assert all(response.headers[name] == value for name, value in SECURITY.items())
        assert "boom in create_app" in caplog.text  # the cause is in the log
        assert served.get("/healthz").status_code == 200
        monkeypatch.undo()
        assert served.get("/api/v1/status").status_code == 200
        assert served.server.app.loaded
