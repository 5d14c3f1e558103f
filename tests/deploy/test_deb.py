"""The agent's Debian package (scripts/build-deb.sh) on a Debian 12 machine with systemd (a container): `apt install
./pdm-edge_*.deb` starts the service; an upgrade to a second build keeps the edited configuration (a conffile) and
the buffer; remove keeps them; purge removes everything. In order, on one machine, as an operator meets them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy import engine
from tests.deploy.systemd_box import SystemdBox, systemd_box
from tests.deploy.test_systemd_agent import config, healthz, readings

pytestmark = pytest.mark.timeout(1200)
UNIT = "pdm-edge.service"
APT = ("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "--yes", "--no-install-recommends")


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory, wheel: Path, wheels: Path) -> tuple[Path, Path, Path]:
    """(the folder, revision 1, revision 2): two builds of the same wheel, the second an upgrade of the first."""
    engine.need_engine()
    tmp = tmp_path_factory.mktemp("deb")
    out = tmp / "dist"
    built = []
    for revision in ("1", "2"):
        started = time.monotonic()
        result = engine.sh("bash", engine.REPO / "scripts/build-deb.sh", "--from", wheel, "--revision", revision,
                           "--out", out, "--cache", tmp / "venv-cache", env={**os.environ,
                                              "PDM_PIP_ARGS": f"--no-index --find-links {wheels}"})
        built.append(Path(result.stdout.strip().splitlines()[-1]))
        print(f"\nbuild-deb.sh revision {revision}: {time.monotonic() - started:.1f} s, "
              f"{built[-1].stat().st_size / 1e6:.0f} MB")
    return tmp, built[0], built[1]


@pytest.fixture(scope="module")
def gateway(debs: tuple[Path, Path, Path], wheel: Path, wheels: Path) -> Iterator[SystemdBox]:
    tmp, _, _ = debs
    with systemd_box(tmp, wheel, wheels, hostname="gw-deb") as box:
        yield box


def test_apt_install_creates_the_user_and_folders_and_starts_the_service(gateway: SystemdBox,
                                                                          debs: tuple[Path, Path, Path]) -> None:
    box, first = gateway, debs[1]
    started = time.monotonic()
    result = box.exec(*APT, f"/dist/{first.name}", check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr + box.diagnose(UNIT)
    print(f"\napt install to active: {time.monotonic() - started:.1f} s")
    props = box.show(UNIT, "ActiveState", "SubState", "UnitFileState", "StatusText")
    assert props["ActiveState"] == "active" and props["UnitFileState"] == "enabled", props
    assert props["StatusText"] == "gateway pdm-edge-gateway: running"
    assert healthz(box)
    assert box.exec("id", "-nG", "pdm-edge").stdout.split() == ["pdm-edge", "dialout"]
    assert box.exec("stat", "-c", "%U:%G %a", "/etc/pdm-edge/agent.toml").stdout.strip() == "root:pdm-edge 640"
    assert box.exec("stat", "-c", "%U:%G %a", "/var/lib/pdm-edge").stdout.strip() == "pdm-edge:pdm-edge 750"
    conffiles = box.exec("dpkg-query", "--showformat=${Conffiles}", "--show", "pdm-edge").stdout
    assert "/etc/pdm-edge/agent.toml" in conffiles
    assert box.exec("pdm-edge", "model", "verify").stdout.startswith("ok: ")  # /usr/bin/pdm-edge


def test_the_edited_configuration_is_used(gateway: SystemdBox) -> None:
    box = gateway
    box.exec("tee", "/etc/pdm-edge/agent.toml", stdin=config().replace("gw-systemd-1", "gw-deb-1"))
    box.exec("systemd-run", "--unit=plant-simulator", "--property=Restart=always", "/usr/bin/pdm-edge", "simulate",
             "modbus", "--machines", "5", "--port", "5020")
    box.systemctl("restart", UNIT)
    assert box.show(UNIT, "StatusText")["StatusText"] == "gateway gw-deb-1: running"
    engine.wait_for("readings stored", lambda: readings(box) > 10, timeout=120)


def test_an_upgrade_keeps_the_edited_configuration_and_the_buffer(gateway: SystemdBox,
                                                                   debs: tuple[Path, Path, Path]) -> None:
    box, second = gateway, debs[2]
    edited = box.exec("cat", "/etc/pdm-edge/agent.toml").stdout
    pid = box.main_pid(UNIT)
    before = readings(box)
    result = box.exec(*APT, f"/dist/{second.name}", check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr + box.diagnose(UNIT)
    assert box.exec("dpkg-query", "--showformat=${Version}", "--show", "pdm-edge").stdout == "0.1.0-2"
    assert box.exec("cat", "/etc/pdm-edge/agent.toml").stdout == edited  # no prompt, no reset: the operator's file
    assert not box.exec("bash", "-c", "ls /etc/pdm-edge/*.dpkg-* 2>/dev/null || true").stdout.strip()
    assert box.active(UNIT) and box.main_pid(UNIT) != pid  # restarted on the new build
    assert box.show(UNIT, "StatusText")["StatusText"] == "gateway gw-deb-1: running"
    assert readings(box) >= before
    engine.wait_for("readings after the upgrade", lambda: readings(box) > before, timeout=120)


def test_remove_keeps_configuration_and_buffer_and_purge_removes_everything(gateway: SystemdBox) -> None:
    box = gateway
    box.systemctl("stop", "plant-simulator")
    box.exec("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "remove", "--yes", "pdm-edge")
    assert not box.active(UNIT)
    assert box.exec("test", "-e", "/opt/pdm-edge", check=False).returncode != 0
    for kept in ("/etc/pdm-edge/agent.toml", "/var/lib/pdm-edge/agent.db"):
        assert box.exec("test", "-f", kept, check=False).returncode == 0, kept
    assert box.exec("getent", "passwd", "pdm-edge", check=False).returncode == 0

    box.exec("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "--yes", "pdm-edge")
    left = box.exec("bash", "-c", "ls -d /opt/pdm-edge /etc/pdm-edge /var/lib/pdm-edge /var/backups/pdm-edge "
                    "/lib/systemd/system/pdm-edge.service /usr/bin/pdm-edge "
                    "/etc/systemd/system/multi-user.target.wants/pdm-edge.service 2>/dev/null || true").stdout
    assert left.strip() == ""
    assert box.exec("getent", "passwd", "pdm-edge", check=False).returncode == 2
    assert box.exec("getent", "group", "pdm-edge", check=False).returncode == 2
    assert box.exec("dpkg-query", "--show", "pdm-edge", check=False).returncode != 0
    assert box.systemctl("is-enabled", UNIT, check=False) in ("", "not-found")
