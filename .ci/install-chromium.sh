#!/bin/sh
# Install Debian's chromium for the headless screenshot test of the HTML report
# (tests/report/test_report.py::test_report_renders_in_headless_chromium).
# Never fails CI: without apt (or without network) the test skips and says why.
set -u
if [ -x /usr/bin/chromium ]; then
    echo "install-chromium: /usr/bin/chromium is already there"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: no apt-get here; the chromium test will be skipped"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "install-chromium: not root and no sudo; the chromium test will be skipped"
        exit 0
    fi
fi
if $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends chromium; then
    echo "install-chromium: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
else
    echo "install-chromium: apt-get could not install chromium; the chromium test will be skipped"
fi
exit 0
