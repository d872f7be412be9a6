#!/usr/bin/env bash
# Installs the Debian packages Postdesk runs for real.
#   (no argument)  what the test suite needs: PostgreSQL, Chromium and Dovecot
#   demo           what `make demo` needs to receive mail offline: Dovecot (skipped, with a note,
#                  when we are not root and have no sudo: the demo then runs without incoming mail)
# Does nothing when the packages are already there.
set -euo pipefail

mode="${1:-test}"
missing=()
[ -x /usr/sbin/dovecot ] || missing+=(dovecot-imapd)
if [ "$mode" = "test" ]; then
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  # Fonts keep Chromium's rendering (and screenshots) readable on a minimal machine.
  [ -d /usr/share/fonts/truetype/dejavu ] || missing+=(fonts-dejavu-core)
fi

[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    if [ "$mode" = "demo" ]; then
      echo "note: not root, so ${missing[*]} is not installed; the demo runs without incoming mail." >&2
      exit 0
    fi
    echo "need root to install: ${missing[*]}" >&2
    exit 1
  fi
  sudo="sudo"
fi
echo "Installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Postdesk runs private Dovecot instances of its own. The package just installed also enabled a
# system-wide one on ports 143/993: switch that off again where systemd runs it.
if [[ " ${missing[*]} " == *" dovecot-imapd "* ]] && command -v systemctl >/dev/null 2>&1 \
   && [ -d /run/systemd/system ]; then
  $sudo systemctl disable --now dovecot.service >/dev/null 2>&1 || true
fi
