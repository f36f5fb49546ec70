"""What every tc-* tool module imports: the Tool base class and the argument helpers (they
live in tcpcopylib.tool)."""

from tcpcopylib.tool import (MAX_SPEED, MIN_SPEED, PROGRESS_INTERVAL, Interrupted, Tool,
                             number_arg)

__all__ = ["MAX_SPEED", "MIN_SPEED", "PROGRESS_INTERVAL", "Interrupted", "Tool", "number_arg"]
