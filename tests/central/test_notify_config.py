"""The notification routes and channels (PDM_CENTRAL_NOTIFY_CONFIG, issue 18 items 3-4): every problem one clear
line, secrets from files and never shown, plain-http webhooks and clear-text SMTP off loopback refused in
production."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from central.notify.config import NotifyConfigError, load, parse
from central.notify.service import Notifications
from central.settings import SettingsError
from tests.central.support import make_settings

SECRET = "s3cret-webhook-key-0123456789"
PASSWORD = "smtp-pass-!x9"


@pytest.fixture
def files(tmp_path) -> Path:
    (tmp_path / "hook-secret").write_text(SECRET + "\n")
    (tmp_path / "smtp-password").write_text(PASSWORD)
    return tmp_path


def valid(folder: Path) -> dict:
    return {
        "channels": {
            "hook": {"type": "webhook", "url": "https://hooks.example.com/pdm",
                     "secret_file": str(folder / "hook-secret")},
            "mail": {"type": "email", "host": "smtp.example.com", "port": 587, "from": "pdm@example.com",
                     "to": ["maint@example.com"], "username": "pdm", "password_file": str(folder / "smtp-password")},
        },
        "routes": [{"name": "line-1", "gateways": ["gw-1"], "from_state": "alarm", "channels": ["hook", "mail"],
                    "escalate_after_min": 30, "digest_after": 10, "digest_window_s": 300}],
    }


def test_a_valid_configuration_reads_its_secrets_and_never_shows_them(files, caplog):
    config = parse(valid(files), production=True)
    hook, mail = config.channels["hook"], config.channels["mail"]
    assert hook.secret.get_secret_value() == SECRET and mail.password.get_secret_value() == PASSWORD
    logging.getLogger("test").warning("config: %r %s %s", config, config, config.model_dump())
    assert SECRET not in caplog.text and PASSWORD not in caplog.text


@pytest.mark.parametrize("url", ["http://hooks.example.com/pdm", "http://10.0.0.5:8080/hook"])
def test_production_refuses_a_plain_http_webhook_off_loopback(files, url):
    data = valid(files)
    data["channels"]["hook"]["url"] = url
    parse(data)  # development: allowed
    with pytest.raises(NotifyConfigError) as refused:
        parse(data, production=True)
    [line] = refused.value.problems
    assert line.startswith("channels.hook.url: plain http") and "https" in line


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/hook", "http://localhost/hook", "http://[::1]:9/h"])
def test_production_allows_plain_http_to_loopback(files, url):
    data = valid(files)
    data["channels"]["hook"]["url"] = url
    parse(data, production=True)


def test_production_refuses_smtp_without_starttls_off_loopback(files):
    data = valid(files)
    data["channels"]["mail"]["starttls"] = False
    with pytest.raises(NotifyConfigError) as refused:
        parse(data, production=True)
    assert refused.value.problems[0].startswith("channels.mail.starttls: false sends")


def test_every_problem_is_listed_at_once_with_where_it_is(files):
    data = valid(files)
    data["routes"].append({"name": "line-1", "channels": ["pager"], "digest_after": 0})
    data["channels"]["hook"]["secret_file"] = str(files / "missing")
    data["channels"]["hook"]["url"] = "http://hooks.example.com"
    data["channels"]["mail"]["port"] = "smtp"
    with pytest.raises(NotifyConfigError) as refused:
        parse(data, production=True)
    assert refused.value.problems == [
        "channels.mail.port: Input should be a valid integer, unable to parse string as an integer",
        "routes[1].digest_after: Input should be greater than or equal to 1",
        "route name 'line-1' is used twice; give each route its own name",
        "routes[1].channels: unknown channel 'pager' (known: hook, mail)",
        f"channels.hook.secret_file: cannot read {files / 'missing'}: No such file or directory",
        ("channels.hook.url: plain http to hooks.example.com would send alarms readable and forgeable on the way; "
        "production needs https (or a loopback address)")]


def test_a_file_that_is_not_toml_is_one_line_naming_it(tmp_path):
    path = tmp_path / "notify.toml"
    path.write_text("[routes\nname = 1")
    with pytest.raises(NotifyConfigError) as refused:
        load(path)
    [line] = refused.value.problems
    assert line.startswith(f"{path}: not valid TOML")


def test_the_api_refuses_to_start_with_a_bad_configuration(central_url, tmp_path):
    path = tmp_path / "notify.toml"
    path.write_text('[[routes]]\nname = "r"\nchannels = ["nowhere"]\n')
    with pytest.raises(SettingsError) as refused:
        Notifications.from_settings(make_settings(central_url, notify_config=path))
    assert refused.value.problems == [(f"PDM_CENTRAL_NOTIFY_CONFIG: {path}: routes[0].channels: unknown channel "
                                      "'nowhere' (known: none)")]


values = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3),
                   st.dictionaries(st.text(max_size=8), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["channels.hook", "channels.mail", "routes.0", "top"]), key=st.text(max_size=15),
       known=st.sampled_from(["type", "url", "secret_file", "timeout_s", "host", "port", "starttls", "from", "to",
                              "username", "password_file", "name", "gateways", "machines", "from_state",
                              "channels", "escalate_after_min", "digest_after", "digest_window_s"]),
       use_known=st.booleans(), value=values, delete=st.booleans())
def test_any_change_to_a_configuration_is_valid_or_a_clear_line_per_problem(files, where, key, known, use_known,
                                                                           value, delete):
    data = valid(files)
    target = data if where == "top" else (data["routes"][0] if where == "routes.0"
                                          else data["channels"][where.split(".")[1]])
    name = known if use_known else key
    if delete:
        target.pop(name, None)
    else:
        target[name] = value
    try:
        parse(data, production=True)
    except NotifyConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            assert line and "\n" not in line and "Value error" not in line
            assert SECRET not in line and PASSWORD not in line
            assert "pydantic" not in line and "type=" not in line
