"""The roster of machines (agent/roster.py): a bounded count, an allow-list, forgetting by silence. A fake clock."""

from __future__ import annotations

from agent.config import MachinesConfig
from agent.roster import Roster
from model.validate import Reason

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
