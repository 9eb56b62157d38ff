#!/usr/bin/env bash
# Fetch the prebuilt OHIF viewer (npm package @ohif/app, its dist/ folder) into deploy/local/ohif/.
# Usage: scripts/fetch-ohif.sh [VERSION]   (default 3.13.2; idempotent: skips when already there)
# The bundle is ~200 MB unpacked and is not committed (deploy/local/ohif/ is gitignored). It is
# not `npm install`ed: the package's dependencies are only needed to build it, and dist/ is prebuilt.
# Its app-config.js is left as shipped: the proxy (and nginx in compose) serve deploy/ohif/app-config.js instead.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${1:-${OHIF_VERSION:-3.13.2}}
DEST=deploy/local/ohif
STAMP="$DEST/.ohif-version"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$VERSION" ] && [ -f "$DEST/index.html" ]; then
    exit 0
fi
command -v npm >/dev/null || { echo "fetch-ohif: npm is needed (Debian package npm, or Node.js)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "Fetching @ohif/app@$VERSION (about 50 MB)..."
tarball=$(cd "$work" && npm pack --silent "@ohif/app@$VERSION" 2>/dev/null | tail -n 1)
tar -xzf "$work/$tarball" -C "$work" package/dist
[ -f "$work/package/dist/index.html" ] || { echo "fetch-ohif: no dist/index.html in $tarball" >&2; exit 1; }
rm -rf "$DEST.tmp" "$DEST"
mv "$work/package/dist" "$DEST.tmp"
echo "$VERSION" > "$DEST.tmp/.ohif-version"
mv "$DEST.tmp" "$DEST"
echo "OHIF $VERSION unpacked into $DEST"
