#!/usr/bin/env bash
# start | stop | status: TorchServe with config.properties and the built archive.
# Re-running start is safe: a running instance is stopped first (and waited
# for, so its JVM and workers are gone), so there is never a duplicate server
# and the archive loaded is the one on disk now. A start fails at once, naming
# the port, where another process holds one of config.properties' ports.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
case "$VENV" in
  /*) VENV_BIN="$VENV/bin" ;;
  *) VENV_BIN="$PWD/$VENV/bin" ;;
esac
export PATH="$VENV_BIN:$PATH"   # workers run the venv's python
case "${1:-}" in
  start)
    [ -f model_store/style_transfer.mar ] || { echo "no archive: run 'make mar'" >&2; exit 1; }
    # --foreground makes --stop wait (up to 60 s) until the old JVM has exited
    torchserve --stop --foreground >/dev/null 2>&1 || true
    python scripts/manage.py ports-free config.properties
    rm -f key_file.json
    mkdir -p workflow_store   # config.properties' workflow_store: stays empty
    # Neither of the launcher's outputs stays with the caller: the JVM
    # inherits both, and its stderr left on a pipe (make demo | tee log) kept
    # that pipe open until the server stopped, so the pipeline never ended.
    # stdout repeats logs/ts_log.log; stderr has what the JVM says before logging starts.
    mkdir -p logs
    torchserve --start --ts-config config.properties --ncs >/dev/null 2>logs/launcher.log \
      || { echo "torchserve did not start: see logs/launcher.log" >&2; exit 1; }
    python scripts/manage.py --timeout "${START_TIMEOUT:-300}" wait \
      || { echo "see logs/launcher.log, logs/ts_log.log and logs/model_log.log" >&2; exit 1; }
    echo "TorchServe is up: inference http://127.0.0.1:8080, management http://127.0.0.1:8081"
    echo "keys are in key_file.json; stop it with: make stop"
    ;;
  stop)
    torchserve --stop --foreground
    ;;
  status)
    python scripts/manage.py describe
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
