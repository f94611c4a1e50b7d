#!/usr/bin/env bash
# Make sure the mosquitto MQTT broker is installed: the fleet-sync tests start a real one.
# Quiet and idempotent when it is already there (on PATH, or in /usr/sbin or /usr/local/sbin).
# As root on Debian/Ubuntu it installs the distribution package; otherwise it prints how to
# install it and exits 1. EDGERT_MOSQUITTO_DIRS overrides the extra directories searched.
set -euo pipefail

find_mosquitto() {
  if command -v mosquitto >/dev/null 2>&1; then
    return 0
  fi
  local dir
  for dir in ${EDGERT_MOSQUITTO_DIRS-/usr/sbin /usr/local/sbin}; do
    if [ -x "$dir/mosquitto" ]; then
      return 0
    fi
  done
  return 1
}

if find_mosquitto; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "ensure-mosquitto: mosquitto not found; installing it with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq mosquitto >/dev/null
  if find_mosquitto; then
    exit 0
  fi
  echo "ensure-mosquitto: apt-get installed mosquitto but no mosquitto executable was found" >&2
  exit 1
fi

cat >&2 <<'MSG'
ensure-mosquitto: the MQTT broker mosquitto (2.0 or newer) is not installed; the fleet-sync
tests start a real one. Install it, then run the tests again:
  Debian/Ubuntu:  sudo apt-get install -y mosquitto
  Fedora:         sudo dnf install -y mosquitto
  macOS:          brew install mosquitto
(The system service it may enable is not needed: the tests start their own broker.)
MSG
exit 1
