"""A stand-in for ``mailserver.workers.worker`` that the zygote tests fork:
it reports what it was given and found, as one JSON line on its channel,
then waits for one line back: ``exit N`` or ``hang`` (until killed)."""

import gc
import json
import os
import socket
import stat
import sys


def main(argv) -> int:
    reactor_installed = "twisted.internet.reactor" in sys.modules
    channel = socket.socket(fileno=int(argv[argv.index("--channel") + 1]))
    listens = [a.split("=")[1].split(":")[0] for i, a in enumerate(argv)
               if i and argv[i - 1] == "--listen"]
    report = {
        "pid": os.getpid(), "argv": argv, "reactor_installed": reactor_installed,
        "frozen": gc.get_freeze_count(), "gc_enabled": gc.isenabled(),
        "preloaded": "mailserver.protocols.smtp" in sys.modules,
        "listen_is_socket": [stat.S_ISSOCK(os.fstat(int(fd)).st_mode) for fd in listens],
    }
    channel.sendall(json.dumps(report).encode() + b"\n")
    order = channel.makefile("rb").readline().decode().split()
    if order and order[0] == "exit":
        return int(order[1])
    while True:
        os.pause()
