"""Several worker processes under one supervisor (``[server] workers``).

:mod:`~mailserver.workers.supervisor` binds the listening sockets and starts
the workers; :mod:`~mailserver.workers.worker` is a worker's entry point;
:mod:`~mailserver.workers.channel` is the AMP conversation between them
(queue wake-ups, the shared login throttle, rate limits and connection
limits); :mod:`~mailserver.workers.gate` asks the supervisor before a
worker's listener takes a connection.  See DESIGN.md section 9.
"""
