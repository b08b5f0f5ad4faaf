"""OpenAI-compatible model serving over hangar machines.

``engine`` builds llama.cpp's ``llama-server`` (once, cached) and its OCI image; ``native``
runs it as a process on loopback; ``tinymodel`` writes a tiny random-weight GGUF model for
tests and demos. ``gateway`` is the OpenAI-shaped front door: it authenticates, routes each
request by ``model`` through a deployment's ``pool`` of replicas, streams answers through
(``sse``), meters tokens, and answers errors in OpenAI's shape (``openai_errors``). What it
needs from the rest of hangar is in ``seams``.
"""
