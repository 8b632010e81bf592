"""Mail storage: maildir delivery and (later) the POP3 view."""
