#!/bin/sh
# Quick start: install mailserver into .venv and run it on etc/quickstart.toml
# (127.0.0.1 only: SMTP 2525, LMTP 2424; files under ./var).
. "$(dirname "$0")/_setup.sh"
exec .venv/bin/twistd -n --pidfile= mailserver --config etc/quickstart.toml
