"""Command-line pipelines: each ``main(argv)`` parses dataclass flags and calls a library function."""
