#!/bin/sh
# Run the whole test suite: installs slapd, ldap-utils and swaks (Debian) and a
# .venv with the test dependencies, then runs pytest.  Extra arguments go to pytest.
MAILSERVER_EXTRA=test
. "$(dirname "$0")/_setup.sh"
dpkg -s postfix >/dev/null 2>&1 || echo "postfix postfix/main_mailer_type select No configuration" | as_root debconf-set-selections
apt_install slapd ldap-utils swaks dovecot-core postfix msmtp fetchmail getmail6
exec .venv/bin/python -m pytest "$@"
