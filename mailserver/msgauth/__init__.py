"""Message authentication: DKIM signing (and checks of SPF, DKIM, DMARC, ARC)."""
