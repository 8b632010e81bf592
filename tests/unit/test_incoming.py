"""A message being received: in memory while small, a scratch file past the
limit or when a file is asked for, nothing left after discard."""

from __future__ import annotations

import os

from mailserver.incoming import IncomingMessage, prepare_spool


def incoming_files(spool):
    return os.listdir(os.path.join(spool, "incoming"))


def test_small_message_stays_in_memory(tmp_path):
    """Below the limit no file is made; the content comes back whole."""
    spool = str(tmp_path)
    prepare_spool(spool)
    msg = IncomingMessage(spool, "Q1", memory_limit=100)
    msg.write(b"Subject: x\r\n")
    msg.write(b"\r\nbody\r\n")
    msg.finish()
    assert incoming_files(spool) == []
    assert msg.data == b"Subject: x\r\n\r\nbody\r\n" and msg.size == 20
    msg.discard()
    assert incoming_files(spool) == []


def test_asking_for_the_path_makes_the_file(tmp_path):
    """The queue and checks read a file: ``path`` writes what is in memory."""
    spool = str(tmp_path)
    prepare_spool(spool)
    msg = IncomingMessage(spool, "Q2", memory_limit=100)
    msg.write(b"abc\r\n")
    with open(msg.path, "rb") as f:
        assert f.read() == b"abc\r\n"
    msg.write(b"def\r\n")  # later chunks go to the file
    msg.finish()
    assert msg.data is None
    with open(msg.path, "rb") as f:
        assert f.read() == b"abc\r\ndef\r\n"
    msg.discard()
    assert incoming_files(spool) == []


def test_large_message_goes_to_disk_past_the_limit(tmp_path):
    """Past the limit everything so far and what follows is in the scratch file."""
    spool = str(tmp_path)
    prepare_spool(spool)
    msg = IncomingMessage(spool, "Q3", memory_limit=10)
    msg.write(b"12345678")
    assert incoming_files(spool) == []
    msg.write(b"90abc")
    msg.finish()
    assert incoming_files(spool) == ["Q3"] and msg.data is None and msg.size == 13
    with open(os.path.join(spool, "incoming", "Q3"), "rb") as f:
        assert f.read() == b"1234567890abc"
    msg.discard()
    assert incoming_files(spool) == []
