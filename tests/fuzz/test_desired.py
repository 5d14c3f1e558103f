"""The agent's reading of central's desired state (sync/desired.py): whatever central or a proxy answers, a
desired state or a validation error (the sync client reports it as transient), never another exception; a
bundle_url can only name a bundle on central itself."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sync.desired import DesiredState

SHA = "a" * 64
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=20)
KEYS = st.sampled_from(["revision", "model", "shadow", "config", "acknowledgements", "name", "version", "sha256",
                        "role", "bundle_url", "overrides"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, JSON, max_size=6))
def test_any_json_object_is_a_desired_state_or_a_validation_error(body):
    try:
        DesiredState.model_validate_json(json.dumps(body))
    except ValidationError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_are_a_desired_state_or_a_validation_error(body):
    try:
        DesiredState.model_validate_json(body)
    except ValidationError:
        pass


@pytest.mark.parametrize("url", ["https://evil.example/api/v1/models/a/1/bundle", "/api/v1/models/../../x/bundle",
                                 "//evil.example/api/v1/models/a/1/bundle", "/api/v1/models/a/1/bundle?x=1",
                                 "/api/v1/models/a%2F../1/bundle"])
def test_a_bundle_url_elsewhere_than_central_is_refused(url):
    model = {"name": "a", "version": "1", "sha256": SHA, "role": "live", "bundle_url": url}
    with pytest.raises(ValidationError):
        DesiredState.model_validate({"revision": 3, "model": model})


def test_fields_a_newer_central_adds_are_ignored_and_acknowledgements_are_kept():
    episode = "7f3c8a52-1d2e-4b7a-9c1f-0a1b2c3d4e5f"
    ack = {"episode_id": episode, "machine_id": "press-1", "acknowledged_at": "2026-12-05T08:00:00Z",
           "acknowledged_by": "ops (cli)", "reason": "a field of a newer central"}
    state = DesiredState.model_validate({"revision": 2, "future": 1, "acknowledgements": [ack]})
    assert state.revision == 2 and state.model is None
    assert [(str(a.episode_id), a.machine_id, a.acknowledged_by) for a in state.acknowledgements] == [
        (episode, "press-1", "ops (cli)")]
