"""tc-capture: not implemented yet."""

from tcpcopylib.cli.common import NotBuiltTool


class Tool(NotBuiltTool):
    name = "tc-capture"
    summary = "(not implemented yet)"


def main(argv=None):
    return Tool().main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
