"""Initial sequence numbers for the engine's unit tests, near 2**32 as well as far from it.

A real capture crosses 2**32 often; a test whose numbers never wrap lets sequence arithmetic
without ``mod 2**32`` pass. A test takes the ``isns`` fixture (import it into the test
module) and unpacks it as ``CISN, TISN, SISN = isns``: the captured client's ISN, the target's
ISN (its SYN-ACK) and the online server's ISN (what the captured acks count from). These are
``Seq`` values (tcpcopylib.testing), so ``CISN + 4`` is the number on the wire even when
CISN is near 2**32.
"""

import pytest

from tcpcopylib.testing import FIXED_ISNS as FIXED
from tcpcopylib.testing import Isns, isns_of

# Each party alone 3 below 2**32 (its first data bytes cross 2**32), then all three at once
# at other distances: the client's first data byte is 0 (its SYN is 2**32 - 1), the target
# wraps after 100 response bytes, the captured acks after 3000.
ISNS = [
    pytest.param(FIXED, id="fixed"),
    pytest.param(isns_of(2**32 - 3, 700000, 50000), id="client-wraps"),
    pytest.param(isns_of(1000, 2**32 - 3, 50000), id="target-wraps"),
    pytest.param(isns_of(1000, 700000, 2**32 - 3), id="server-wraps"),
    pytest.param(isns_of(2**32 - 1, 2**32 - 100, 2**32 - 3000), id="all-wrap"),
]


@pytest.fixture(params=ISNS)
def isns(request) -> Isns:
    return request.param
