"""The roster of machines (agent/roster.py): a bounded count, an allow-list, forgetting by silence. A fake clock."""

from __future__ import annotations

import time

import pytest

from agent.config import MachinesConfig
from agent.counters import BufferCounters
from agent.roster import Roster
from drivers.base import RawReading
from model.validate import Reason
from testkit.net import free_port

HOUR = 3600.0


def test_machines_beyond_the_limit_are_refused_until_one_has_been_silent_long_enough():
    roster = Roster(MachinesConfig(max_machines=2, forget_after_h=1), configured=[], last_seen={})
    assert roster.admit("a", 0.0) is None and roster.admit("b", 0.0) is None
    refused = roster.admit("c", 10.0)
    assert refused.reason is Reason.UNKNOWN_MACHINE and "machines.max_machines = 2" in refused.message
    assert roster.admit("a", HOUR) is None  # a known machine is always taken, and is heard again
    assert roster.admit("c", HOUR + 1) is None  # b was silent for more than an hour: forgotten, its place free
    assert roster.admit("b", HOUR + 2) is not None


def test_listed_machines_are_always_taken_and_others_never_with_an_allow_list():
    roster = Roster(MachinesConfig(max_machines=1, allowed=["press-*", "lathe-7"]), configured=["modbus-1"],
                    last_seen={})
    for machine in ("press-1", "press-2", "lathe-7", "modbus-1"):
        assert roster.admit(machine, 0.0) is None
    assert "not in machines.allowed" in roster.admit("lathe-8", 0.0).message


def test_machines_known_before_a_restart_keep_their_places():
    roster = Roster(MachinesConfig(max_machines=1), configured=[], last_seen={"old": 0.0})
    assert roster.admit("new", 60.0) is not None
    assert roster.admit("old", 60.0) is None


def test_listed_machines_do_not_count_and_an_upgrade_keeps_the_most_recent_known_ones():
    seen = {f"old-{i}": float(i) for i in range(5)} | {"modbus-1": 100.0}
    roster = Roster(MachinesConfig(max_machines=2), configured=["modbus-1"], last_seen=seen)
    assert roster.known == 2  # old-3 and old-4, the most recent; modbus-1 is listed
    assert roster.admit("old-4", 200.0) is None and roster.admit("old-0", 200.0) is not None
    assert roster.admit("modbus-1", 200.0) is None and roster.known == 2


def test_an_agents_opcua_machines_are_listed_like_its_modbus_devices(tmp_path):
    """Regression: the machines of [[opcua]] servers were left out of the roster, so with machines.allowed set
    their readings were quarantined as unknown machines."""
    pytest.importorskip("asyncua", reason="the opcua extra: pip install 'pdm-edge[opcua]'")
    from drivers.simulator_opcua import node_config
    from tests.agent.test_status import HEALTHY, make_agent, wait_for

    agent = make_agent(tmp_path, machines={"allowed": ["press-*"]})
    agent.config = agent.config.model_copy(update={"opcua": [node_config({"plc-m1": "M"}, free_port())]})
    agent.start()
    try:
        now = time.time()
        for machine in ("plc-m1", "stranger"):
            agent.pipeline.put(RawReading(machine, now, dict(HEALTHY), "test", now))
        wait_for(lambda: agent.store.counters().readings_accepted + agent.store.counters().rejected_total == 2,
                 "both readings to be committed")
        assert agent.store.counters() == BufferCounters(readings_accepted=1, rejected={"unknown_machine": 1})
        assert [q.machine_id for q in agent.store.quarantine(10)] == ["stranger"]
    finally:
        agent.stop()
