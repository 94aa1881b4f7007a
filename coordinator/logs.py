"""The coordinator's logs: the shared ones (meshgate/logs.py), named here for old imports."""

from meshgate.logs import (
    REQUEST_ID_HEADER,
    AccessLogMiddleware,
    JsonFormatter,
    RequestIdFilter,
    RequestIdMiddleware,
    accept_request_id,
    current_request_id,
    new_request_id,
    setup_json_logging,
    setup_logging,
)

__all__ = [
    "REQUEST_ID_HEADER", "AccessLogMiddleware", "JsonFormatter", "RequestIdFilter",
    "RequestIdMiddleware", "accept_request_id", "current_request_id", "new_request_id",
    "setup_json_logging", "setup_logging",
]
