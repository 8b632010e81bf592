"""The push-producer half shared by the SMTP and POP3 adapters.

Each adapter registers itself as its transport's streaming producer: when
the write buffer fills, the transport calls :meth:`pauseProducing` and the
adapter stops handling commands (and, by its own ``_update_reading`` rule,
perhaps stops reading); when the buffer drains, :meth:`resumeProducing`
starts it again.  The class using this provides ``write_paused``,
``closing``, ``busy``, ``core``, ``_update_reading`` and ``_drive``.
"""

from __future__ import annotations


class WriteBackPressure:
    """``IPushProducer`` for an adapter whose replies fill its transport."""

    def pauseProducing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        if not self.write_paused:
            return
        self.write_paused = False
        self._update_reading()
        if not self.busy and self.core is not None:
            self._drive()

    def stopProducing(self) -> None:
        self.closing = True
