#!/bin/sh
# Run the whole test suite: installs slapd, ldap-utils and swaks (Debian) and a
# .venv with the test dependencies, then runs pytest.  Extra arguments go to pytest.
MAILSERVER_EXTRA=test
. "$(dirname "$0")/_setup.sh"
apt_install slapd ldap-utils swaks dovecot-core
exec .venv/bin/python -m pytest "$@"
