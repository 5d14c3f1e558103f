"""arm64: the agent installed from the project's wheel and the aarch64 wheels of its dependencies (the same versions
as on x86-64) into a Debian 12 arm64 root file system (debootstrap), run under emulation (qemu-user-static through
binfmt_misc, chroot): `pdm-edge model verify` passes and `pdm-edge model score` gives the scores of x86-64 within
1e-5. Full level (PDM_DEPLOY_TESTS=full): the install takes minutes under emulation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.deploy import engine

pytestmark = pytest.mark.timeout(2400)
READINGS = engine.REPO / "examples/readings.jsonl"
NUMBERS = ("p_failure",)  # and the risks; health is printed to 0.1, compared below


def scores(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_arm64_install_verifies_the_model_and_scores_as_x86_64(tmp_path: Path, wheel: Path) -> None:
    engine.need_full()
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip("no binfmt handler for aarch64 (qemu-user-static, binfmt-support: scripts/deploy-tools.sh)")
    tarball = engine.rootfs_tarball("python", "arm64")
    wheels = engine.wheelhouse(wheel, arch="arm64")
    amd64 = engine.wheelhouse(wheel)
    root = tmp_path / "arm64"
    root.mkdir()
    try:
        with tarfile.open(tarball) as tar:
            tar.extractall(root, filter="fully_trusted")
        shutil.copytree(wheels, root / "wheels")
        shutil.copy2(wheel, root / "wheels" / wheel.name)
        shutil.copy2(READINGS, root / "readings.jsonl")

        def chroot(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            return engine.sh("chroot", root, "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "HOME=/root",
                             "PYTHONDONTWRITEBYTECODE=1", *args, input=stdin, timeout=1800)

        assert chroot("uname", "-m").stdout.strip() == "aarch64"
        started = time.monotonic()
        chroot("python3", "-m", "venv", "/opt/pdm-edge/venv")
        chroot("/opt/pdm-edge/venv/bin/pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
               "--find-links", "/wheels", f"/wheels/{wheel.name}")
        print(f"\narm64 (emulated) pip install: {time.monotonic() - started:.1f} s")
        # the same versions as x86-64's wheels
        versions = chroot("/opt/pdm-edge/venv/bin/pip", "list", "--format=freeze").stdout
        for name in ("onnxruntime", "numpy"):
            line = next(v for v in versions.splitlines() if v.lower().startswith(name + "=="))
            assert any(p.name.lower().startswith(line.replace("==", "-").lower() + "-") for p in amd64.iterdir()), line
        verify = chroot("/opt/pdm-edge/venv/bin/pdm-edge", "model", "verify")
        assert verify.stdout.startswith("ok: "), verify.stdout + verify.stderr
        started = time.monotonic()
        arm = scores(chroot("/opt/pdm-edge/venv/bin/pdm-edge", "model", "score",
                            stdin=READINGS.read_text()).stdout)
        print(f"arm64 (emulated) model score of {len(arm)} readings: {time.monotonic() - started:.1f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    native = scores(engine.sh(Path(sys.executable).parent / "pdm-edge", "model", "score",
                              input=READINGS.read_text()).stdout)
    assert len(arm) == len(native) == len(READINGS.read_text().splitlines())
    worst = 0.0
    assert any("p_failure" in n for n in native)
    for a, n in zip(arm, native, strict=True):
        if "p_failure" not in n:  # a reading refused (the same reason on both)
            assert a == n
            continue
        assert a["state"] == n["state"] and a["dominant_mode"] == n["dominant_mode"]
        assert abs(float(a["health"]) - float(n["health"])) <= 0.1 + 1e-9  # type: ignore[arg-type]
        pairs = [(float(a[k]), float(n[k])) for k in NUMBERS]  # type: ignore[arg-type]
        pairs += [(float(a["risk"][m]), float(n["risk"][m])) for m in n["risk"]]  # type: ignore[index, attr-defined]
        worst = max([worst, *(abs(x - y) for x, y in pairs)])
    print(f"largest difference arm64 - x86-64: {worst:.2e}")
    assert worst <= 1e-5
