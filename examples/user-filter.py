#!/usr/bin/env python3
"""A user filter in a dozen lines (tcpcopy(7), USER FILTERS): the test tenant instead of
production's, and no health checks.  tc-readpcap prod.pcap | ./user-filter.py | tc-session ..."""
from tcpcopylib.filters import Filter


class TestTenant(Filter):
    name = "user-filter"

    def data(self, conn, data, end):
        if b"\r\n\r\n" not in data and not end:
            return None  # wait for the whole head (it comes back with the next bytes)
        if conn.first and data.startswith(b"GET /health"):
            conn.drop()  # nothing of this connection is replayed
        return data.replace(b"tenant=prod", b"tenant=test")  # same length: no header to fix


if __name__ == "__main__":
    raise SystemExit(TestTenant().main())
