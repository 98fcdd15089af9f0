"""RFC 9457 problem details: the errors of the controller's service layer
and their JSON form.

Every error the REST layer returns is ``application/problem+json`` with
``type``, ``title``, ``status`` and ``detail``; a model error adds ``field``
(the field the library names, e.g. ``Site.subnets``).

>>> p = problem(404, "Not Found", "no site 'x'")
>>> p["status"], p["type"]
(404, 'about:blank')
"""

from __future__ import annotations

from typing import Any

from ..errors import PatronusError

__all__ = ["ServiceError", "NotFound", "Conflict", "PreconditionFailed", "PreconditionRequired",
           "Unavailable", "problem", "PROBLEM_JSON"]

PROBLEM_JSON = "application/problem+json"


class ServiceError(PatronusError):
    """An operation refused by the service layer; ``status`` is its HTTP status."""

    status = 400
    title = "Bad Request"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        self.detail = detail
        self.field = field
        super().__init__(detail)


class NotFound(ServiceError):
    status = 404
    title = "Not Found"


class Conflict(ServiceError):
    """The change clashes with the current state (a duplicate name, a policy priority in use)."""

    status = 409
    title = "Conflict"


class PreconditionFailed(ServiceError):
    """``If-Match`` names a version that is not the current one (a lost update refused)."""

    status = 412
    title = "Precondition Failed"


class PreconditionRequired(ServiceError):
    status = 428
    title = "Precondition Required"


class Unavailable(ServiceError):
    status = 503
    title = "Service Unavailable"


def problem(status: int, title: str, detail: str | None = None, *, field: str | None = None,
            type_: str = "about:blank", **extra: Any) -> dict[str, Any]:
    """The JSON body of a problem details response."""
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if field is not None:
        body["field"] = field
    body.update(extra)
    return body
