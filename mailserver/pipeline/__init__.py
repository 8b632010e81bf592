"""The acceptance pipeline shared by every listener that takes mail in.

:mod:`~mailserver.pipeline.session` holds the per-connection and
per-message state, :mod:`~mailserver.pipeline.acceptance` the pipeline and
its :class:`~mailserver.pipeline.acceptance.Check` hooks,
:mod:`~mailserver.pipeline.auth` SMTP AUTH against the directory, and
:mod:`~mailserver.pipeline.submission` the checks of the submission service
(sender ownership, rate limits, the RFC 6409 header fixes).
"""
