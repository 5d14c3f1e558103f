#!/usr/bin/env bash
# The long reliability run behind RELIABILITY.md: every fault-injection, kill -9, fuzzing and soak test at full
# scale (PDM_RELIABILITY=long, see tests/scale.py: 200+ kills, an hour of soak, many more fuzz cases), plus the
# fault tests of other folders that RELIABILITY.md names. About two hours on two cores. The short variant of the
# same tests runs with the everyday suite (./scripts/test.sh). Runs as root for the full-disk test (it mounts a
# small tmpfs). Extra arguments go to pytest; the figures are printed, the soak's also written to
# artifacts/reliability/soak-long.json. PDM_CRASH_SEED=N replays the random kill moments of a run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PDM_RELIABILITY=long
export PDM_DEPLOY_TESTS=full # the images, the Compose stack and arm64 too (scripts/deploy-tests.sh)
exec ./scripts/test.sh -s -q tests/reliability tests/fuzz \
    tests/agent/test_run.py::test_kill_9_at_random_moments_loses_and_duplicates_nothing \
    tests/agent/test_store.py::test_every_reported_commit_survives_sigkill_mid_write \
    tests/agent/test_pipeline.py \
    tests/central/test_faults.py tests/sync/test_client.py \
    tests/drivers/test_mqtt_broker.py tests/drivers/test_modbus_driver.py \
    tests/deploy/test_agent_container.py tests/deploy/test_compose.py tests/deploy/test_arm64.py \
    tests/test_bench.py tests/model/test_training.py "$@"
