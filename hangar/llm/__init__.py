"""OpenAI-compatible model serving over hangar machines.

``engine`` builds llama.cpp's ``llama-server`` and its OCI image; ``tinymodel`` writes a tiny
random-weight GGUF model for tests and demos; ``gateway`` is the OpenAI-shaped front door that
authenticates, routes each request by ``model`` to a replica, streams answers through, meters
tokens and scales replicas to zero and back through the seams in ``seams``.
"""
