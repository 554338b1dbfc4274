#!/usr/bin/env bash
# Install the Debian packages given as arguments when they are missing (as root, or with sudo).
# Used by the Makefile for the Bible recipes (SWORD texts) and the browser test (Chromium).
set -uo pipefail
need=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
    echo "sysdeps: no apt-get here; install ${need[*]} yourself (tests needing them are skipped)" >&2
    exit 0
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "sysdeps: installing Debian packages ${need[*]}"
if ! { $sudo apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
           "${need[@]}" >/dev/null; }; then
    echo "sysdeps: could not install ${need[*]}; tests needing them are skipped" >&2
fi
exit 0
