#!/bin/sh
# Installs Debian's chromium for tests/test_diff_browser.py (headless, offline).
# Idempotent and quiet; exits 0 with a message where apt or root is unavailable,
# so the browser test then skips with its reason instead of failing.
set -u
for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "install-browser: $(command -v "$name") already installed"
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: apt-get is not available; install chromium yourself to run the browser test"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-browser: needs root (or passwordless sudo) to apt-get install chromium"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -qq >/dev/null 2>&1 \
        && $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    echo "install-browser: installed $(command -v chromium)"
else
    echo "install-browser: apt-get could not install chromium (offline?); the browser test will skip"
fi
exit 0
