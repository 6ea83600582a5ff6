"""CLI subcommands: one module each, discovered by `dualrerank.cli` (names starting with `_` are helpers)."""
