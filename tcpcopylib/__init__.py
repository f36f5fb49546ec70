"""tcpcopylib: TCP stream replay for realistic testing of Internet servers.

One library under a family of small command-line filters (tc-readpcap, tc-capture,
tc-session, tc-pace, tc-emit, tc-intercept, tc-feedback, tc-dump) that exchange
records as a labeled CBOR sequence; see man/man5/tcpcopy-records.5.
"""

__version__ = "0.1.0"
