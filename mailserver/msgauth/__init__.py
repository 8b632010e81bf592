"""Message authentication: SPF, DKIM, ARC and DMARC.

Inbound (checks on the MX): :mod:`.lookups` (the libraries' blocking DNS,
bounded), :mod:`.spf_check`, :mod:`.dkim_verify`, :mod:`.dmarc`,
:mod:`.results` (the Authentication-Results header), :mod:`.strip` (forged
ones removed) and :mod:`.inbound` (the acceptance-pipeline check).

Outbound: :mod:`.keys` (DKIM keys per domain and selector) and
:mod:`.dkim_sign` (signing submitted mail and forwarded copies).
"""
