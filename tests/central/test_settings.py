"""Settings from PDM_CENTRAL_ variables: secrets from files and credentials, and what production mode refuses."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from central.app import create_app
from central.settings import DEFAULT_DATABASE_URL, Settings, SettingsError, load_settings
from testkit.central import OPS_TOKEN

STRONG = {"PDM_CENTRAL_MODE": "production", "PDM_CENTRAL_OPS_TOKEN": OPS_TOKEN,
          "PDM_CENTRAL_DATABASE_URL": "postgresql://pdm@db.internal:5432/pdm_central"}
ENV_EXAMPLE = Path(__file__).resolve().parents[2] / "central" / "env.example"


def test_defaults_serve_development_on_loopback():
    settings = load_settings({})
    assert settings.mode == "development"
    assert settings.host_port == ("127.0.0.1", 8000)
    assert settings.database_url.get_secret_value() == DEFAULT_DATABASE_URL
    assert settings.ops_token is None and settings.cors_origins == [] and settings.trusted_proxies == []
    assert settings.serving_problems() == []


def test_variables_are_read_and_lists_split_on_commas():
    settings = load_settings({
        "PDM_CENTRAL_CORS_ORIGINS": "https://ops.example.com, http://localhost:3000",
        "PDM_CENTRAL_TRUSTED_PROXIES": "10.0.0.5,192.168.1.0/24",
        "PDM_CENTRAL_MAX_BODY_BYTES": "2048", "pdm_central_log_level": "debug", "PDM_CENTRAL_BIND": "[::1]:9000",
    })
    assert settings.cors_origins == ["https://ops.example.com", "http://localhost:3000"]
    assert settings.trusted_proxies == [ipaddress.ip_network("10.0.0.5/32"), ipaddress.ip_network("192.168.1.0/24")]
    assert settings.max_body_bytes == 2048
    assert settings.log_level == "DEBUG"
    assert settings.host_port == ("::1", 9000)


def test_the_production_settings_used_below_are_accepted():
    assert load_settings(STRONG).serving_problems() == []


WEAK = "short-token"


@pytest.mark.parametrize(("change", "refusal"), [
    ({"PDM_CENTRAL_OPS_TOKEN": None}, "PDM_CENTRAL_OPS_TOKEN: required in production"),
    ({"PDM_CENTRAL_OPS_TOKEN": WEAK}, "PDM_CENTRAL_OPS_TOKEN (environment): too weak"),
    ({"PDM_CENTRAL_OPS_TOKEN": "a" * 64}, "PDM_CENTRAL_OPS_TOKEN (environment): too weak"),
    ({"PDM_CENTRAL_OPS_TOKEN": "0123456789" * 3 + "0"}, "too weak"),  # 31 characters
    ({"PDM_CENTRAL_OPS_TOKEN": "abcdefghij" * 3 + "ab"}, "too weak"),  # issue 22: 32 characters, 10 distinct
    ({"PDM_CENTRAL_CORS_ORIGINS": "*"}, "PDM_CENTRAL_CORS_ORIGINS: '*'"),
    ({"PDM_CENTRAL_CORS_ORIGINS": "https://ops.example.com,*"}, "PDM_CENTRAL_CORS_ORIGINS: '*'"),
    ({"PDM_CENTRAL_TRUSTED_PROXIES": "0.0.0.0/0"}, "PDM_CENTRAL_TRUSTED_PROXIES: 0.0.0.0/0 trusts"),
    ({"PDM_CENTRAL_TRUSTED_PROXIES": "::/0"}, "PDM_CENTRAL_TRUSTED_PROXIES: ::/0 trusts"),
    ({"PDM_CENTRAL_DATABASE_URL": None}, "PDM_CENTRAL_DATABASE_URL: required in production"),
    ({"PDM_CENTRAL_DATABASE_URL": "postgresql://pdm:hunter2@db/pdm"}, "holds a password in a plain environment"),
    ({"PDM_CENTRAL_DATABASE_URL": "host=db dbname=pdm user=pdm password=hunter2"}, "holds a password in a plain"),
    ({"PDM_CENTRAL_DATABASE_URL": "postgresql://pdm@db/pdm?password=hunter2"}, "holds a password in a plain"),
    ({"PDM_CENTRAL_READ_DATABASE_URL": "postgresql://pdm:hunter2@replica/pdm"},
     "PDM_CENTRAL_READ_DATABASE_URL: holds a password in a plain"),
], ids=["ops-token-missing", "ops-token-short", "ops-token-one-character", "ops-token-31", "ops-token-ten-distinct", "cors-wildcard", "cors-wildcard-among-others", "proxies-all-ipv4",
        "proxies-all-ipv6", "database-url-default", "database-password-inline", "database-password-keyword",
        "database-password-query", "read-database-password-inline"])
def test_production_refuses(change, refusal):
    environ = {k: v for k, v in {**STRONG, **change}.items() if v is not None}
    settings = load_settings(environ)
    problems = settings.serving_problems()
    assert len(problems) == 1 and refusal in problems[0], problems
    with pytest.raises(SettingsError) as raised:
        create_app(settings)
    assert raised.value.problems == problems
    assert "hunter2" not in str(problems) and WEAK not in str(problems)
    development = load_settings({**environ, "PDM_CENTRAL_MODE": "development"})
    assert development.serving_problems() == []


def test_production_lists_every_problem_at_once():
    problems = load_settings({"PDM_CENTRAL_MODE": "production", "PDM_CENTRAL_CORS_ORIGINS": "*"}).serving_problems()
    assert len(problems) == 3  # ops token, CORS, database URL


def test_a_database_password_is_accepted_from_a_file_or_a_credential(tmp_path):
    url = "postgresql://pdm:hunter2@db.internal/pdm_central"
    (tmp_path / "url").write_text(url + "\n")
    environ = {**STRONG, "PDM_CENTRAL_DATABASE_URL": None, "PDM_CENTRAL_DATABASE_URL_FILE": str(tmp_path / "url")}
    from_file = load_settings({k: v for k, v in environ.items() if v is not None})
    assert from_file.database_url.get_secret_value() == url
    assert from_file.serving_problems() == []

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "database_url").write_text(url)
    (credentials / "ops_token").write_text(OPS_TOKEN + "\n")
    from_credentials = load_settings({"PDM_CENTRAL_MODE": "production", "CREDENTIALS_DIRECTORY": str(credentials)})
    assert from_credentials.database_url.get_secret_value() == url
    assert from_credentials.ops_token.get_secret_value() == OPS_TOKEN
    assert from_credentials.serving_problems() == []
    assert from_credentials.redacted()["database_url"] == "postgresql://pdm:***@db.internal/pdm_central"
    assert from_credentials.redacted()["ops_token"] == "***"


@pytest.mark.parametrize("url", [
    "postgresql://pdm:hunter2@db.internal/pdm_central",
    "host=db.internal dbname=pdm_central user=pdm password=hunter2",
    "host=db.internal password='hunter2' sslmode=require",
    "postgresql://pdm@db.internal/pdm_central?password=hunter2&sslmode=require",
    "postgres://pdm:other@db.internal/pdm_central?password=hunter2",
    "not a conninfo at all hunter2",
])
def test_no_form_of_database_password_reaches_the_settings_log(tmp_path, url):
    """Issue 22 item 4: the start-up log's settings mask every password form libpq reads, from a _FILE too."""
    (tmp_path / "url").write_text(url)
    environ = {k: v for k, v in STRONG.items() if k != "PDM_CENTRAL_DATABASE_URL"}
    settings = load_settings({**environ, "PDM_CENTRAL_DATABASE_URL_FILE": str(tmp_path / "url")})
    shown = settings.redacted()["database_url"]
    assert "hunter2" not in shown and "other" not in shown
    assert "***" in shown or "not shown" in shown


def test_the_environment_ranks_above_credentials(tmp_path):
    (tmp_path / "ops_token").write_text("from-the-credential")
    settings = load_settings({"PDM_CENTRAL_OPS_TOKEN": "from-the-environment", "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert settings.ops_token.get_secret_value() == "from-the-environment"


@pytest.mark.parametrize(("environ", "message"), [
    ({"PDM_CENTRAL_OPS_TOKN": "x"}, "PDM_CENTRAL_OPS_TOKN: unknown variable"),
    ({"PDM_CENTRAL_OPS_TOKEN": "a", "PDM_CENTRAL_OPS_TOKEN_FILE": "/x"}, "PDM_CENTRAL_OPS_TOKEN is set too"),
    ({"PDM_CENTRAL_OPS_TOKEN_FILE": "/nonexistent/token"}, "cannot use /nonexistent/token as the secret"),
    ({"PDM_CENTRAL_MODE": "prod"}, "PDM_CENTRAL_MODE='prod'"),
    ({"PDM_CENTRAL_MAX_BODY_BYTES": "lots"}, "PDM_CENTRAL_MAX_BODY_BYTES='lots'"),
    ({"PDM_CENTRAL_CORS_ORIGINS": "https://ops.example.com/dashboard"}, "is not an origin"),
    ({"PDM_CENTRAL_TRUSTED_PROXIES": "10.0.0.300"}, "PDM_CENTRAL_TRUSTED_PROXIES"),
    ({"PDM_CENTRAL_BIND": "8000"}, "PDM_CENTRAL_BIND"),
    ({"PDM_CENTRAL_POOL_MIN_SIZE": "5", "PDM_CENTRAL_POOL_MAX_SIZE": "2"}, "below PDM_CENTRAL_POOL_MIN_SIZE"),
])
def test_invalid_settings_name_the_variable(environ, message):
    with pytest.raises(SettingsError) as raised:
        load_settings(environ)
    assert any(message in problem for problem in raised.value.problems), raised.value.problems


def test_an_empty_secret_file_is_refused_without_echoing_anything(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError, match="it is empty"):
        load_settings({"PDM_CENTRAL_OPS_TOKEN_FILE": str(tmp_path / "empty")})


def test_an_invalid_secret_is_not_echoed():
    with pytest.raises(SettingsError) as raised:
        load_settings({"PDM_CENTRAL_DATABASE_URL": "postgresql://u:hunter2@h/d", "PDM_CENTRAL_MODE": "x"})
    assert "hunter2" not in str(raised.value)


def test_the_agents_variables_are_not_ours():
    settings = load_settings({"PDM_CENTRAL__URL": "https://central.example.com", "PDM_CENTRAL__TOKEN": "t",
                              "PDM_GATEWAY_ID": "gw-1"})
    assert settings == load_settings({})


def test_an_empty_variable_counts_as_unset():
    assert load_settings({"PDM_CENTRAL_OPS_TOKEN": "", "PDM_CENTRAL_MODE": ""}) == load_settings({})


def test_env_example_documents_every_setting():
    documented = set(re.findall(r"^#? ?(PDM_CENTRAL_[A-Z_]+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    expected = {f"PDM_CENTRAL_{name.upper()}" for name in Settings.model_fields if name != "sources"}
    assert expected <= documented
    assert documented - expected <= {"PDM_CENTRAL_OPS_TOKEN_FILE", "PDM_CENTRAL_DATABASE_URL_FILE"}


def test_the_read_replica_url_is_a_secret_from_a_file_and_redacted_in_logs(tmp_path):
    (tmp_path / "read").write_text("postgresql://pdm:hunter2@replica/pdm\n")
    settings = load_settings({**STRONG, "PDM_CENTRAL_READ_DATABASE_URL_FILE": str(tmp_path / "read")})
    assert settings.sources["read_database_url"] == "file" and settings.serving_problems() == []
    assert settings.read_database_url.get_secret_value() == "postgresql://pdm:hunter2@replica/pdm"
    assert settings.redacted()["read_database_url"] == "postgresql://pdm:***@replica/pdm"
