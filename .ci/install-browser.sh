#!/bin/sh
# Install Debian's chromium for the browser test (tests/test_browser.py) when it is missing.
#
# Never fails CI: if the browser cannot be installed (no apt-get, not root and no sudo, no network),
# it says why and exits 0, and the browser test skips with its reason. Prints the browser's path
# and version when one is available, so the CI log shows what the test ran against.
# Usage: .ci/install-browser.sh   (APT_TIMEOUT=seconds bounds each apt-get call, default 900)

found() {
    for b in "${LSTM_HARNESS_BROWSER:-}" /usr/bin/chromium chromium chromium-browser; do
        [ -n "$b" ] || continue
        path=$(command -v "$b" 2>/dev/null) || continue
        echo "install-browser: using $path ($("$path" --version 2>/dev/null || echo 'version unknown'))"
        return 0
    done
    return 1
}

if found; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no apt-get on this machine; the browser test will skip" >&2
    exit 0
fi

if [ "$(id -u)" = 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"
else
    echo "install-browser: not root and no password-less sudo; the browser test will skip" >&2
    exit 0
fi

limit="${APT_TIMEOUT:-900}"
bounded() {
    if command -v timeout >/dev/null 2>&1; then timeout "$limit" "$@"; else "$@"; fi
}

echo "install-browser: installing chromium with apt-get"
if bounded $as_root apt-get update -q \
    && bounded $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; then
    found || echo "install-browser: apt-get succeeded but no chromium on PATH; the browser test will skip" >&2
else
    echo "install-browser: apt-get could not install chromium; the browser test will skip" >&2
fi
exit 0
