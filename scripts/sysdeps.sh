#!/usr/bin/env bash
# Install the Debian packages given as arguments when they are missing (as root, or with sudo).
# Used by the Makefile for the Bible recipes (SWORD texts), the browser test (Chromium) and
# train.compile (g++).
# Under CI=true a package that cannot be installed fails (exit 1): the tests that need it
# would otherwise not run. Elsewhere it is a warning and those tests are skipped.
set -uo pipefail
need=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
case "${CI:-}" in 1|true|TRUE|True|yes) strict=1 ;; *) strict=0 ;; esac
fail() {
    echo "sysdeps: $1" >&2
    if [ "$strict" -eq 1 ]; then
        echo "sysdeps: CI=true: failing, since the tests that need ${need[*]} cannot run" >&2
        exit 1
    fi
    echo "sysdeps: the tests that need them are skipped (pytest -rs lists them)" >&2
    exit 0
}
command -v apt-get >/dev/null || fail "no apt-get here; install ${need[*]} yourself"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "sysdeps: installing Debian packages ${need[*]}"
if ! { $sudo apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
           "${need[@]}" >/dev/null; }; then
    fail "could not install ${need[*]}"
fi
exit 0
