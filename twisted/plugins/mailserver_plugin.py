"""twistd plugin: ``twistd -n mailserver --config FILE``."""

from twisted.application.service import ServiceMaker

mailserver = ServiceMaker(
    "mailserver",
    "mailserver.tap",
    "SMTP MX, LMTP and maildir mail host with an LDAP directory",
    "mailserver",
)
