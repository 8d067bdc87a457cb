#!/usr/bin/env bash
# start | stop | status: TorchServe with config.properties and the built archive.
# Re-running start is safe: this checkout's running instance is stopped first
# (and waited for, so its JVM and workers are gone), so there is never a
# duplicate server and the archive loaded is the one on disk now; another
# checkout's server is never touched. A start fails at once, naming the port
# and its holder, where another process holds one of config.properties' ports.
# The addresses waited for and printed are config.properties' own.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
case "$VENV" in
  /*) VENV_BIN="$VENV/bin" ;;
  *) VENV_BIN="$PWD/$VENV/bin" ;;
esac
export PATH="$VENV_BIN:$PATH"   # workers run the venv's python
# TorchServe keeps its pid file in TMPDIR (which server `torchserve --stop`
# stops) and its workers' sockets in Java's temp dir (TEMP): both in a
# directory of this checkout's own, so that stop, and start (which stops
# first), act on this checkout's server only, and two checkouts' workers
# never share a socket. Short: a socket's path has at most 107 bytes.
# Private to this user: its sockets and the compile cache in it are trusted,
# and a name in /tmp can be taken first by anyone.
RUN_DIR="/tmp/style-transfer-$(id -u)-$(pwd -P | cksum | cut -d' ' -f1)"   # one per checkout, however reached
mkdir -p -m 700 "$RUN_DIR"
if [ -z "$(find "$RUN_DIR" -maxdepth 0 -user "$(id -u)" -perm 700)" ]; then
  echo "$RUN_DIR is not a directory of this user's only (mode 700): remove it" >&2; exit 1
fi
export TMPDIR="$RUN_DIR" TEMP="$RUN_DIR"
MANAGE=(python scripts/manage.py --config config.properties)
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
    # TorchServe writes key_file.json, then makes it 0600: created under
    # umask 077, it is never readable by others in between.
    umask 077
    torchserve --start --ts-config config.properties --ncs >/dev/null 2>logs/launcher.log \
      || { echo "torchserve did not start: see logs/launcher.log" >&2; exit 1; }
    if ! "${MANAGE[@]}" --timeout "${START_TIMEOUT:-300}" wait; then
      torchserve --stop --foreground >/dev/null 2>&1 || true   # not left running, unseen
      echo "see logs/launcher.log, logs/ts_log.log and logs/model_log.log" >&2
      exit 1
    fi
    echo "TorchServe is up: inference $("${MANAGE[@]}" address inference), management $("${MANAGE[@]}" address management)"
    echo "keys are in key_file.json; stop it with: make stop"
    ;;
  stop)
    torchserve --stop --foreground
    rmdir "$RUN_DIR/models" "$RUN_DIR" 2>/dev/null || true   # kept where a compile cache is in it
    ;;
  status)
    "${MANAGE[@]}" describe
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
