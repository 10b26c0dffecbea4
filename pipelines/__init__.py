"""Ray wiring and command-line entrypoints. Everything that computes lives in ``blip2``."""
