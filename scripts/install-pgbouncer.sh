#!/usr/bin/env bash
# Installs PgBouncer for the tests (Debian's `pgbouncer` package) when its binary is missing.
#
# Idempotent and quiet: prints nothing and exits 0 when `pgbouncer` is already on PATH or in
# /usr/sbin. Never starts the package's own system service (a policy-rc.d refuses it during
# the install, and the service is stopped and disabled afterwards if it started anyway): the
# tests run private PgBouncers on free loopback ports, and the machine's shared servers are
# left alone. Exits 1 with a message on stderr when it cannot install (not root, no apt-get,
# no network).
set -euo pipefail

have() {
    command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]
}

if have; then
    exit 0
fi

fail() {
    echo "install-pgbouncer: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "pgbouncer is not installed and installing it needs root (run: apt-get install pgbouncer)"
command -v apt-get >/dev/null 2>&1 || fail "pgbouncer is not installed and there is no apt-get to install it with"

# Serialise concurrent installs (several test binaries may ask at once).
exec 9>/tmp/install-pgbouncer.lock
flock 9
if have; then
    exit 0
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Refuse service starts during the install (invoke-rc.d honours policy-rc.d); restore any
# policy the machine already had.
policy=/usr/sbin/policy-rc.d
saved=""
if [ -e "$policy" ]; then
    saved=$(mktemp)
    cp -p "$policy" "$saved"
fi
restore_policy() {
    if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
    rm -f "$log"
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' >"$policy"
chmod 755 "$policy"

export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends pgbouncer >"$log" 2>&1; then
    # The package lists may be missing or stale on a fresh machine.
    apt-get update -q >>"$log" 2>&1 || true
    apt-get install -y -q --no-install-recommends pgbouncer >>"$log" 2>&1 || {
        tail -n 20 "$log" >&2
        fail "apt-get install pgbouncer failed (output above)"
    }
fi

# Belt and braces: the packaged service must not run.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now pgbouncer >/dev/null 2>&1 || true
elif [ -x /etc/init.d/pgbouncer ]; then
    /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true
fi

have || fail "apt-get installed pgbouncer but no pgbouncer binary was found"
