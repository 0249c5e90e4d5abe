#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite, slow real-model tests included.
# pytest's exit code 5 ("no tests collected") would mean the suite vanished: report it as a failure
# with a clear message instead of passing silently.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit $?
# The diff page is tested in a real headless Chromium (Debian package); without apt/root
# the browser test skips and says why.
bash scripts/install-browser.sh
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: the test suite is missing" >&2
fi
exit "$rc"
