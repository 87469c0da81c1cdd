#!/usr/bin/env bash
# Builds a recent PgBouncer (1.24.1, the version of Debian 13 "trixie") for the tests that need
# protocol-level prepared statements (`max_prepared_statements`, PgBouncer 1.21 and later).
# Debian 12's package is 1.18, and trixie's binary package needs a newer glibc, so this builds
# trixie's source: the upstream tarball from Debian's archive, checked against the SHA-256 in
# trixie's `Sources` index, configured without PAM, systemd and c-ares (none is used by the
# tests), and installed under $PREFIX (default /opt/resilient-diesel/pgbouncer-1.24.1), outside
# the checkout because the tests run PgBouncer as an unprivileged user.
#
# Idempotent and quiet: prints nothing and exits 0 when $PREFIX/bin/pgbouncer already runs.
# Needs root (apt-get installs libevent-dev, the one build dependency missing from a fresh
# machine), gcc, make and network access to deb.debian.org. Exits 1 with a message on stderr
# when it cannot build. Never starts a PgBouncer.
set -euo pipefail

VERSION=1.24.1
SHA256=da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0
URL="http://deb.debian.org/debian/pool/main/p/pgbouncer/pgbouncer_${VERSION}.orig.tar.gz"
PREFIX=${PREFIX:-/opt/resilient-diesel/pgbouncer-${VERSION}}

have() {
    "$PREFIX/bin/pgbouncer" --version 2>/dev/null | grep -q "PgBouncer ${VERSION}"
}

if have; then
    exit 0
fi

fail() {
    echo "install-pgbouncer-recent: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || fail "PgBouncer ${VERSION} is not built and building it needs root (apt-get install libevent-dev, then run this script as root)"
for tool in gcc make curl tar sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || fail "PgBouncer ${VERSION} is not built and '$tool' is missing"
done

# Serialise concurrent builds (several test binaries may ask at once).
mkdir -p "$(dirname "$PREFIX")"
exec 9>"$(dirname "$PREFIX")/.build-pgbouncer.lock"
flock 9
if have; then
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$work/log"

need=()
for pkg in libevent-dev libssl-dev pkg-config; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || fail "missing ${need[*]} and there is no apt-get to install them with"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${need[@]}" >"$log" 2>&1; then
        apt-get update -q >>"$log" 2>&1 || true
        apt-get install -y -q --no-install-recommends "${need[@]}" >>"$log" 2>&1 || {
            tail -n 20 "$log" >&2
            fail "apt-get install ${need[*]} failed (output above)"
        }
    fi
fi

tarball="$work/pgbouncer.tar.gz"
curl -fsS --retry 3 -m 120 -o "$tarball" "$URL" || fail "could not download $URL"
echo "$SHA256  $tarball" | sha256sum -c --quiet - >/dev/null 2>&1 ||
    fail "$URL does not match the SHA-256 of Debian's Sources index ($SHA256)"
tar -xzf "$tarball" -C "$work"
cd "$work/pgbouncer-${VERSION}"
{
    ./configure --prefix="$PREFIX" --without-pam --without-systemd --without-cares --with-openssl &&
        make -j"$(nproc)" &&
        make install
} >>"$log" 2>&1 || {
    tail -n 30 "$log" >&2
    fail "building PgBouncer ${VERSION} failed (output above)"
}
chmod -R a+rX "$PREFIX"
have || fail "built PgBouncer ${VERSION} but $PREFIX/bin/pgbouncer does not run"
