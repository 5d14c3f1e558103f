"""A Debian 12 machine with systemd as its init, in a container (never systemd as PID 1 on the host): the gateway or
central server of the systemd and .deb tests.

The box has the repository's files at /src (read-only: install.sh, the units, the examples), the dependency wheels
at /wheels and the project's wheel at /dist, and installs with pip from those only (no network needed for that).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.deploy import engine
from tests.deploy.conftest import BUILD_LITTER

# systemd leaves a container's mounts as the engine made them (private); the credentials it mounts for a service in
# a helper's namespace then never reach the service (an empty root-only $CREDENTIALS_DIRECTORY). A host's systemd
# makes / shared at boot: so does the box, before exec'ing systemd as PID 1.
SHARED_INIT = ("/bin/sh", "-c", "mount --make-rshared / && exec /sbin/init")
PIP_OFFLINE = "--no-index --find-links /wheels --find-links /dist"


class SystemdBox(engine.Container):
    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.exec("systemctl", *args, check=check, timeout=180).stdout.strip()

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.exec("systemctl", "show", unit, "--no-pager", *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit, "MainPID")["MainPID"])

    def journal(self, unit: str, since_cursor: str | None = None) -> list[dict[str, object]]:
        """The unit's journal entries as journalctl -o json gives them."""
        args = ["journalctl", "--no-pager", "-o", "json", "-u", unit]
        if since_cursor:
            args += ["--after-cursor", since_cursor]
        out = self.exec(*args, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def cursor(self) -> str:
        out = self.exec("journalctl", "--no-pager", "-o", "json", "-n", "1").stdout.strip().splitlines()
        return str(json.loads(out[-1])["__CURSOR"]) if out else ""

    def messages(self, unit: str, since_cursor: str | None = None) -> list[str]:
        return [str(entry.get("MESSAGE", "")) for entry in self.journal(unit, since_cursor)]

    def diagnose(self, unit: str) -> str:
        """systemctl status and the journal's last lines: the message of a failed assertion."""
        status = self.exec("systemctl", "status", "--no-pager", "-l", unit, check=False).stdout
        journal = self.exec("journalctl", "--no-pager", "-o", "cat", "-n", "40", "-u", unit, check=False).stdout
        return f"\n--- systemctl status {unit}\n{status}\n--- journal\n{journal}"

    def active(self, unit: str) -> bool:
        return self.systemctl("is-active", unit, check=False) == "active"


@contextmanager
def systemd_box(tmp: Path, project_wheel: Path, wheels: Path, hostname: str = "gw-test") -> Iterator[SystemdBox]:
    image = engine.rootfs_image("systemd")
    src = tmp / "src"
    if not src.exists():
        shutil.copytree(engine.REPO, src, ignore=shutil.ignore_patterns(*BUILD_LITTER, "tests", "bench"))
    dist = tmp / "dist"
    dist.mkdir(exist_ok=True)
    shutil.copy2(project_wheel, dist / project_wheel.name)
    with engine.container(image, "--systemd=always", "--hostname", hostname, "--cap-add", "SYS_ADMIN",
                          "--security-opt", "unmask=/sys/fs/cgroup", "--volume", f"{src}:/src:ro",
                          "--volume", f"{wheels}:/wheels:ro", "--volume", f"{dist}:/dist:ro",
                          prefix="pdm-test-systemd", command=SHARED_INIT) as running:
        box = SystemdBox(running.name)
        def state() -> str:  # "" until systemd listens on its bus
            return box.exec("systemctl", "is-system-running", "--wait", check=False, timeout=180).stdout.strip()

        reached = str(engine.wait_for("systemd in the container", lambda: state() not in ("", "offline", "starting",
                                                                                        "initializing"), 180))
        if state() not in ("running", "degraded"):
            failed = box.exec("systemctl", "--failed", "--no-pager", check=False).stdout
            raise AssertionError(f"systemd in the container is {reached!r}:\n{failed}")
        yield box
