"""Helpers for tests and local runs: this project's trickle server, in process.

    server = TrickleServer()                  # 127.0.0.1, a free port
    events_url = server.create_channel("events")
    ...
    server.close()
"""

from ._native import TrickleServer

__all__ = ["TrickleServer"]
