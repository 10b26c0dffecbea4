"""Serving, without the server: request parsing and validation, OpenAI chat messages, and the batched
runtime that a Ray Serve replica (``pipelines/serve.py``) and the benchmark's in-process baseline share."""
