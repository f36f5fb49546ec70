"""Filters in the pipe: change client bytes in flight, keep or drop whole sessions.

- stream: the rewriting engine (per-connection sequence renumbering, in-order data,
  bounds) that lets any transform change a stream's length without breaking TCP;
- rules: tc-rewrite's rules (replace, regex, header-set, header-remove, host, url), the
  rule file, and the raw-stream transform;
- http: HTTP/1.x request heads and the request-by-request transform;
- select: tc-select's rules and the stage that holds a connection's records until its
  first request decides;
- api: the user filter API (Filter, a dozen lines make a stage);
- pipe: a rewriting stage between a record stream in and out.
"""

from tcpcopylib.filters.api import ConnView, Filter  # noqa: F401
from tcpcopylib.filters.stream import Drop, StreamRewriter, Transform  # noqa: F401
