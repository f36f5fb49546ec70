"""tc-session's library: the TCP client simulation (engine), address mapping, input timing."""

from tcpcopylib.session.engine import OUTCOMES, Config, Engine
from tcpcopylib.session.mapping import Mapper, parse_target, parse_transfer

__all__ = ["OUTCOMES", "Config", "Engine", "Mapper", "parse_target", "parse_transfer"]
