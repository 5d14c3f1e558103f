"""The agent's image (./Dockerfile, built by scripts/images.sh on a Debian 12 base made from Debian's packages) run
with podman as DEPLOYMENT.md runs it: a mounted configuration polling the plant simulator (itself the same image) over
Modbus TCP, the buffer in a volume, a read-only root, no capabilities. Full level (PDM_DEPLOY_TESTS=full).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.deploy import engine

pytestmark = pytest.mark.timeout(1800)
DB = "/var/lib/pdm-edge/agent.db"
COUNT = ("import sqlite3, sys; c = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True); "
         "print(c.execute('SELECT COUNT(*) FROM readings').fetchone()[0], "
         "c.execute('PRAGMA integrity_check').fetchone()[0])")


@pytest.fixture(scope="module")
def plant(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A network with the simulator on it, a volume, the agent's configuration file."""
    image = images["pdm-edge"]
    suffix = f"{int(time.time())}-{id(images) % 10000}"
    network, volume = f"pdm-test-net-{suffix}", f"pdm-test-data-{suffix}"
    engine.sh("podman", "network", "create", network)
    engine.sh("podman", "volume", "create", volume)
    tmp = tmp_path_factory.mktemp("agent-container")
    text = (engine.REPO / "examples/simulator-modbus.toml").read_text()
    text = text.replace('gateway_id = "simulator"', 'gateway_id = "gw-container-1"')
    text = text.replace('data_dir = "/tmp/pdm-edge-simulator"', 'data_dir = "/var/lib/pdm-edge"')
    text = text.replace('log_format = "text"', 'log_format = "json"').replace('host = "127.0.0.1"', 'host = "plant"')
    config = tmp / "agent.toml"
    config.write_text(text)
    config.chmod(0o644)
    try:
        with engine.container(image, "--network", network, "--network-alias", "plant", "--read-only",
                              prefix="pdm-test-plant", command=("simulate", "modbus", "--host", "0.0.0.0",
                                                                "--port", "5020", "--machines", "5")):
            yield {"image": image, "network": network, "volume": volume, "config": str(config)}
    finally:
        engine.sh("podman", "volume", "rm", "--force", volume, check=False)
        engine.sh("podman", "network", "rm", "--force", network, check=False)


def run_args(plant: dict[str, str]) -> list[str]:
    return ["--network", plant["network"], "--volume", f"{plant['volume']}:/var/lib/pdm-edge",
            "--volume", f"{plant['config']}:/etc/pdm-edge/agent.toml:ro", "--read-only", "--tmpfs", "/tmp",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--stop-timeout", "30"]


def stored(box: engine.Container) -> int:
    out = box.exec("python", "-c", COUNT, DB).stdout.split()
    assert out[1] == "ok"
    return int(out[0])


def healthy(box: engine.Container) -> bool:
    return engine.sh("podman", "healthcheck", "run", box.name, check=False).returncode == 0


def test_the_agent_runs_healthy_as_uid_10001_on_a_read_only_root(plant: dict[str, str]) -> None:
    started = time.monotonic()
    with engine.container(plant["image"], *run_args(plant), prefix="pdm-test-agent") as box:
        engine.wait_for("the image's HEALTHCHECK to pass", lambda: healthy(box), timeout=120)
        print(f"\nagent container start to healthy: {time.monotonic() - started:.1f} s")
        assert box.exec("id", "-u").stdout.strip() == "10001"
        assert box.exec("touch", "/opt/venv/x", check=False).returncode != 0  # read-only root
        assert box.exec("python", "-c", "import urllib.request; print(urllib.request.urlopen("
                        "'http://127.0.0.1:8080/healthz', timeout=3).status)").stdout.strip() == "200"
        engine.wait_for("readings in the volume", lambda: stored(box) > 10, timeout=120)
        # nothing of the build stage in the runtime layer: no pip, no setuptools in the venv
        listing = box.exec("ls", "/opt/venv/lib/python3.11/site-packages").stdout.split()
        assert not [name for name in listing if name.startswith(("pip", "setuptools"))], listing


def test_data_survive_a_restart_and_a_kill_9_and_stop_exits_0_with_everything_committed(
        plant: dict[str, str]) -> None:
    with engine.container(plant["image"], *run_args(plant), prefix="pdm-test-agent") as box:
        engine.wait_for("readings", lambda: healthy(box) and stored(box) > 0, timeout=120)
        engine.sh("podman", "restart", "--time", "30", box.name)
        assert box.inspect("{{.State.Running}}") == "true"
        first = stored(box)
        engine.wait_for("readings after the restart", lambda: stored(box) > first, timeout=120)

        engine.sh("podman", "kill", "--signal", "KILL", box.name)
        engine.sh("podman", "start", box.name)
        engine.wait_for("healthy after kill -9", lambda: healthy(box), timeout=120)
        second = stored(box)
        assert second >= first  # what was committed before the kill is there
        engine.wait_for("readings after kill -9", lambda: stored(box) > second, timeout=120)

        started = time.monotonic()
        engine.sh("podman", "stop", "--time", "30", box.name)
        print(f"\npodman stop -t 30: {time.monotonic() - started:.1f} s")
        assert box.inspect("{{.State.ExitCode}}") == "0"
        assert '"message": "pdm-edge stopped"' in box.logs()  # not "...: readings still queued were not acknowledged"
    # the volume, read by a fresh container: intact
    check = engine.sh("podman", "run", "--rm", "--volume", f"{plant['volume']}:/var/lib/pdm-edge",
                      "--entrypoint", "python", plant["image"], "-c", COUNT, DB).stdout.split()
    assert check[1] == "ok" and int(check[0]) > second


def test_the_image_is_small_and_holds_no_build_tools(images: dict[str, str]) -> None:
    sizes = {}
    for name, image in images.items():
        sizes[name] = int(engine.sh("podman", "image", "inspect", "--format", "{{.Size}}", image).stdout) / 1e6
    print(f"\nimage sizes (uncompressed): {', '.join(f'{n} {s:.0f} MB' for n, s in sizes.items())}")
    du = engine.sh("podman", "run", "--rm", "--entrypoint", "sh", images["pdm-edge"], "-c",
                   "du -sm /opt/venv /usr/lib/python3.11 /usr/lib/x86_64-linux-gnu /usr/share 2>/dev/null; "
                   "du -sm /opt/venv/lib/python3.11/site-packages/* | sort -rn | head -6").stdout
    print(du)
    assert "pip" not in du.split() and "setuptools" not in du
    health = engine.sh("podman", "image", "inspect", "--format", "{{.Config.Healthcheck}}",
                       images["pdm-edge"]).stdout
    assert "healthz" in health  # kept: built with --format docker
