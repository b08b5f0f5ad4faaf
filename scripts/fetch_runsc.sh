#!/usr/bin/env bash
# Install gVisor's runsc into DEST/bin from Debian trixie's package (bookworm has none),
# without touching the system's apt sources: a private sources list and package lists.
# Idempotent: does nothing when DEST/bin/runsc already runs.
set -euo pipefail
dest=${1:?usage: fetch_runsc.sh DEST}
mkdir -p "$dest/bin"
dest=$(cd "$dest" && pwd)
if [ -x "$dest/bin/runsc" ] && "$dest/bin/runsc" --version >/dev/null 2>&1; then
	exit 0
fi
if command -v runsc >/dev/null 2>&1 && runsc --version >/dev/null 2>&1; then
	ln -sf "$(command -v runsc)" "$dest/bin/runsc"
	exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The mirror this machine's own bookworm entry uses.
uri=$(grep -hoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
	| grep -v security | awk 'NR == 1 {print $2}' || true)
uri=${uri:-http://deb.debian.org/debian}
echo "deb $uri trixie main" >"$work/trixie.list"
mkdir -p "$work/lists/partial" "$work/archives/partial"
opts=(-o "Dir::Etc::SourceList=$work/trixie.list" -o Dir::Etc::SourceParts=/dev/null
	-o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
	-o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
apt-get "${opts[@]}" update -qq
(cd "$work" && apt-get "${opts[@]}" download runsc)
dpkg -x "$work"/runsc_*.deb "$work/unpacked"
install -m 0755 "$work/unpacked/usr/bin/runsc" "$dest/bin/runsc.partial"
mv "$dest/bin/runsc.partial" "$dest/bin/runsc"
"$dest/bin/runsc" --version | sed -n 1p  # sed reads it all: no SIGPIPE under pipefail
