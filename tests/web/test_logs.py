"""A ``?token=`` link's secret never reaches the server's access log."""

from __future__ import annotations

import io
import logging
import logging.config

from hangar.web.logs import redact, uvicorn_log_config


def test_tokens_in_query_strings_are_redacted() -> None:
    assert redact("GET /ui/?token=hgr_abc&x=1 HTTP/1.1") == "GET /ui/?token=REDACTED&x=1 HTTP/1.1"
    assert redact("/ui/?a=1&TOKEN=hgr_abc") == "/ui/?a=1&TOKEN=REDACTED"
    assert redact("/v1/tokens/tok_1") == "/v1/tokens/tok_1"


def test_uvicorns_access_log_is_configured_to_redact() -> None:
    config = uvicorn_log_config()
    stream = io.StringIO()
    config["handlers"]["access"]["stream"] = stream
    logging.config.dictConfig(config)
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/ui/?token=hgr_secret", "1.1", 200
    )
    assert "hgr_secret" not in stream.getvalue() and "token=REDACTED" in stream.getvalue()
