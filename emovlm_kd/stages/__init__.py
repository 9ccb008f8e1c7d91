"""The training stages: one module per stage, each with `build_parser()` and `run(args) -> dict` (its summary)."""
