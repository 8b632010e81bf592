# Shared by quickstart.sh and test.sh: make .venv with mailserver installed.
# Usage: [MAILSERVER_EXTRA=test] . scripts/_setup.sh   ("test" adds the test dependencies;
# a variable, because POSIX sh passes no arguments to a sourced file)
set -eu
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2; return 1; fi
}

apt_install() {
    # Install the Debian packages named, if any of them is missing.
    missing=""
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        echo "installing Debian packages:$missing"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
}

# Debian's own Python when it is new enough: unlike one under /root (pyenv),
# the service user the server drops to can run it.
if [ -z "${PYTHON:-}" ] && /usr/bin/python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    PYTHON=/usr/bin/python3
fi
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    apt_install python3
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv 2>/dev/null || { apt_install python3-venv; rm -rf .venv; "$PYTHON" -m venv .venv; }
fi
extra=${MAILSERVER_EXTRA:-}
spec="."
[ -n "$extra" ] && spec=".[$extra]"
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q "$spec"
