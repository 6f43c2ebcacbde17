#!/bin/sh
# Headless Chromium for the browser tests (Debian's package; never `playwright install`).
set -eu
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "ensure_chromium: chromium missing and not root; install it with: apt-get install -y chromium" >&2
        exit 0
    fi
fi
echo "ensure_chromium: installing Debian's chromium" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium
