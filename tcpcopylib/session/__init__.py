"""tc-session's library: the TCP client simulation (engine), address mapping, input timing."""

from tcpcopylib.session.engine import OUTCOMES, Config, Engine  # noqa: F401
from tcpcopylib.session.mapping import Mapper, parse_target, parse_transfer  # noqa: F401
