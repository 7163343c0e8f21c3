#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, real embedded model included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# The report's browser test (tests/test_report_browser.py) drives Debian's chromium through Playwright.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing Debian's chromium for the report's browser test"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || echo "test: apt-get could not install chromium; tests/test_report_browser.py will fail" >&2
  else
    echo "test: chromium is missing; install Debian's chromium package as root (apt-get install chromium)," \
         "or tests/test_report_browser.py fails" >&2
  fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
