"""The app's log lines in Ray Serve's replica logs, each with the request id that caused it.

Ray Serve configures only its own ``ray.serve`` logger (per ``logging_config`` in the YAML:
TEXT or JSON, level, access log) and writes it to the replica's file under the session's
``logs/serve/``. Our modules log under ``serve_app.*``, which would otherwise end up in the
worker's stderr file without a request id. :func:`route_to_serve_logs`, called in each
deployment's constructor, sends them to the same handlers, and stamps every record with the
request id and route of Serve's request context (which Ray propagates through handle
calls), in TEXT mode too, where Ray adds it only to access-log lines.

Secrets: nothing here logs headers or bodies; keys are never logged (a test greps the logs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ray.serve._private.constants import SERVE_LOG_REQUEST_ID, SERVE_LOG_ROUTE, SERVE_LOGGER_NAME

APP_LOGGER = "serve_app"


def current_request_id() -> str:
    """The request id in Serve's request context ('' outside a request)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id


class _ToServeLog(logging.Handler):
    """Stamps a record with Serve's request context, then hands it to Serve's handlers.

    A handler, not a logger filter: filters of ``serve_app`` do not see the records of its
    children (``serve_app.ingress``, ...), handlers do.
    """

    def emit(self, record: logging.LogRecord) -> None:
        from ray.serve.context import _get_serve_request_context

        context = _get_serve_request_context()
        if context.request_id and not hasattr(record, SERVE_LOG_REQUEST_ID):
            setattr(record, SERVE_LOG_REQUEST_ID, context.request_id)
        if context.route and not hasattr(record, SERVE_LOG_ROUTE):
            setattr(record, SERVE_LOG_ROUTE, context.route)
        for handler in logging.getLogger(SERVE_LOGGER_NAME).handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def route_to_serve_logs() -> None:
    """Send ``serve_app.*`` records to this replica's Serve log file, with request ids."""
    serve_logger = logging.getLogger(SERVE_LOGGER_NAME)
    app_logger = logging.getLogger(APP_LOGGER)
    app_logger.handlers = [_ToServeLog()]
    app_logger.setLevel(serve_logger.level)
    app_logger.propagate = False


# Ray sends the request id with every handle call (gRPC metadata): bound what one call
# carries when it was caused by many requests.
_MAX_IDS_CHARS = 4096


def tag_request_ids(request_ids: Iterable[str]) -> None:
    """Make the current task's handle calls and log lines carry these request ids.

    A coalesced call or a model batch is caused by many requests: the Model's and the
    FeatureFetcher's log lines for it carry all their ids, comma-separated (cut at 4 KiB,
    with ``+N`` for the ids left out). Changes only the current task's context.
    """
    from ray.serve.context import _set_request_context

    unique = list(dict.fromkeys(rid for rid in request_ids if rid))
    if not unique:
        return
    joined = ",".join(unique)
    if len(joined) > _MAX_IDS_CHARS:
        kept = joined[:_MAX_IDS_CHARS].rsplit(",", 1)[0]
        joined = f"{kept},+{len(unique) - kept.count(',') - 1}"
    _set_request_context(request_id=joined)


def batch_request_ids() -> list[str]:
    """The request ids of the calls in the running ``@serve.batch`` batch."""
    from ray.serve.context import _get_serve_batch_request_context

    return [context.request_id for context in _get_serve_batch_request_context()]
