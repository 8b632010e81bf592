"""Delivery targets: local maildirs now; the remote queue later."""
