"""Command-line tools: one module per tool, each a thin Tool subclass over the library."""
