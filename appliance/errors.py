"""The error hierarchy: every failure a sender or an operator can see, with its meaning.

    ApplianceError
    ├── HTTPError                  answered to a sender as {"error": code, "message": text}
    │   ├── NotFound               404 not_found
    │   ├── MethodNotAllowed       405 method_not_allowed
    │   ├── Unavailable            503 unavailable       (draining, store unavailable)
    │   ├── Overloaded             503 overloaded        (body budget or connection cap spent)
    │   ├── PayloadTooLarge        413 too_large
    │   ├── BodyTimeout            503 body_timeout
    │   ├── Unauthorized           401 unauthorized
    │   ├── InvalidJSON            400 invalid_json
    │   ├── InvalidPayload         400 invalid_payload
    │   ├── InjectedFailure        500 injected_failure  (staging retry drill)
    │   ├── ImportFailed           500 import_failed     (ack: imported)
    │   └── Internal               500 internal
    ├── AuthFailure                a delivery's credentials were refused (becomes Unauthorized;
    │                              its `reason` goes to the log, never to the sender)
    ├── ConfigError                an operator's config file is wrong (file:line: key: why)
    ├── ReloadRefused              a reload was refused; the previous config keeps serving
    ├── KeyLoadError               bearer keys could not be loaded (file, URL, PEM)
    ├── CommandFailed              a CLI command could not do what was asked (exit 1)
    │   └── AdminRefused           the admin listener refused the CLI (token or Host)
    ├── IllegalTransition          a lifecycle event that the record's state does not allow
    └── StoreError                 the store cannot do what was asked
        ├── StoreFull              disk or map full: writes answer 503 until space is freed
        ├── StoreUnavailable       the database is down, read-only or failing over: 503
        ├── SchemaError            the database schema is not this release's (db migrate)
        └── StoreLocked            another process holds the store (server vs maintenance)

The `code` of an HTTPError is also the `outcome` label of ct_appliance_requests_total.
"""

from __future__ import annotations

import json


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""


class HTTPError(ApplianceError):
    status = 500
    code = "internal"
    retry_after: int | None = None

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code)
        self.message = message or self.code

    def body(self) -> bytes:
        return json.dumps({"error": self.code, "message": self.message}).encode()


class NotFound(HTTPError):
    status, code = 404, "not_found"


class MethodNotAllowed(HTTPError):
    status, code = 405, "method_not_allowed"


class Unavailable(HTTPError):
    status, code, retry_after = 503, "unavailable", 5


class Overloaded(HTTPError):
    status, code, retry_after = 503, "overloaded", 5


class PayloadTooLarge(HTTPError):
    status, code = 413, "too_large"


class BodyTimeout(HTTPError):
    status, code, retry_after = 503, "body_timeout", 1


class Unauthorized(HTTPError):
    status, code = 401, "unauthorized"


class InvalidJSON(HTTPError):
    status, code = 400, "invalid_json"


class InvalidPayload(HTTPError):
    status, code = 400, "invalid_payload"


class InjectedFailure(HTTPError):
    status, code = 500, "injected_failure"


class ImportFailed(HTTPError):
    status, code = 500, "import_failed"


class Internal(HTTPError):
    status, code = 500, "internal"


class AuthFailure(ApplianceError):
    """Authentication failed; `reason` goes to the log, never to the sender."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(ApplianceError):
    """One or more problems in a config file; each line names file, line and key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ReloadRefused(ApplianceError):
    """A new config (or what it names: keys, certificate) was refused; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class KeyLoadError(ApplianceError):
    """No usable verification key could be loaded."""


class CommandFailed(ApplianceError):
    """A CLI command could not do what was asked; the message is for the operator."""


class AdminRefused(CommandFailed):
    """The admin listener answered, and refused: the token or the Host is not accepted."""


class IllegalTransition(ApplianceError):
    """An event the delivery's current state does not allow (lifecycle.TRANSITIONS)."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"{event} is not allowed in state {state}")
        self.state = state
        self.event = event


class StoreError(ApplianceError):
    """The store failed in a way that is not the caller's fault."""


class StoreFull(StoreError):
    """No space left (disk full, or a map that cannot grow): writes fail, reads still work."""


class StoreUnavailable(StoreError):
    """The database cannot take writes now (down, read-only, failing over): 503 until a
    write works again."""


class SchemaError(StoreError):
    """The database's schema is not the one this binary was built for."""


class StoreLocked(StoreError):
    """The store is held by another process: a server, or a maintenance command."""
