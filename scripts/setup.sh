#!/usr/bin/env bash
# Install what dicom-node needs on Debian 12: system packages with apt-get, Python packages into .venv/.
# Usage: scripts/setup.sh [--test]   (--test also installs the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(orthanc orthanc-dicomweb dcmtk dicom3tools chromium python3-venv openssl)
# The tests start throwaway PostgreSQL clusters of their own (initdb + pg_ctl on free ports) to
# test the scaled-out ledger; the single-box node itself needs no PostgreSQL.
[ "${1:-}" = "--test" ] && DEBIAN_PACKAGES+=(postgresql)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
# npm fetches the prebuilt OHIF viewer and the browser-test driver; any Node.js >= 18 will do.
command -v npm >/dev/null || missing+=(nodejs npm)
if ((${#missing[@]})); then
    echo "Installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    # The Debian orthanc package starts a system service on ports 4242/8042; the demo and the
    # tests run their own Orthanc on other ports, so that service is left as the admin set it.
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
stamp=".venv/.installed${extras:+-test}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # torch is pinned to 2.13.0 in pyproject.toml: an unpinned torch pulls gigabytes of CUDA wheels.
    .venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
    touch "$stamp"
fi

# OHIF viewer bundle for the demo, deploy/local/stack.py and tests/integration/test_ohif.py (gitignored).
scripts/fetch-ohif.sh

if [ "${1:-}" = "--test" ]; then
    # Browser driver: playwright-core only, driving the Debian chromium; never a downloaded browser.
    if [ ! -d tests/integration/browser/node_modules/playwright-core ] \
        || [ tests/integration/browser/package-lock.json -nt tests/integration/browser/node_modules ]; then
        (cd tests/integration/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
    fi
fi
