#!/usr/bin/env bash
# Fetches htmx (a progressive enhancement: every page also works without it) from the npm registry
# into the static directory. It is not committed: the repository holds only code written here.
set -uo pipefail
target="$1"
version="2.0.4"
mkdir -p "$(dirname "$target")"
if ! command -v npm >/dev/null 2>&1; then
  echo "npm not found: pages will work without htmx (full page loads instead of partial updates)" >&2
  exit 0
fi
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
if (cd "$workdir" && npm pack --silent "htmx.org@$version" >/dev/null 2>&1) \
   && tar -xzf "$workdir"/htmx.org-*.tgz -C "$workdir" package/dist/htmx.min.js; then
  cp "$workdir/package/dist/htmx.min.js" "$target"
else
  echo "could not fetch htmx.org@$version from npm: pages will work without it" >&2
fi
exit 0
