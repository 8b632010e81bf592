"""mailserver: a small-organisation mail host on Twisted.

This module holds the version only; importing it imports nothing from
twisted.internet, so the reactor can be chosen later.
"""

__version__ = "0.1.0"
