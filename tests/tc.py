"""The tests' face of the testing kit (tcpcopylib/testing.py): import from here.

It also checks that the tcpcopylib under test is this checkout's: the kit runs the tools
of the tree tcpcopylib was imported from, and the tests must test the same tree.
"""

from pathlib import Path

from tcpcopylib import testing
from tcpcopylib.testing import (BIN, REPO, call, cbor_items, chain, decode, pcap,  # noqa: F401
                                run, stream, tool_env, tool_path)

if REPO != Path(__file__).resolve().parent.parent:
    raise ImportError(f"tcpcopylib is imported from {testing.__file__}, not from the checkout "
                      f"of these tests ({Path(__file__).parent.parent}): set PYTHONPATH")

env = tool_env  # the old name, for tests written before the kit (use tool_env)
