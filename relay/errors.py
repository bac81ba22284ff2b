"""The error tree of relay.

    RelayError
    ├── ProviderError                 something went wrong talking to a provider
    │   ├── ProviderUnavailable       retry later: timeout, connection error, 5xx
    │   │   └── RateLimited           retry later, after `retry_after` seconds (429)
    │   ├── SubmitOutcomeUnknown      the request may have reached the provider: do not resend blindly
    │   ├── ProviderRejected          fail now: 4xx, content policy, a failed task
    │   └── ProviderProtocolError     the provider answered something we cannot read (retry later)
    ├── ArchiveError                  an image could not be saved
    │   ├── SourceGone                the source link is dead (404/410/expired): fail the task
    │   │   └── InvalidImage          the bytes are not a valid image of the claimed type
    │   ├── ReferenceUnavailable      a reference image (images, mask) could not be fetched; `permanent` or not
    │   └── (ArchiveError itself)     retryable: timeout, truncated download
    ├── BlockedAddress                the SSRF guard refused an outbound URL
    └── ApiError                      mapped to API.md's error shape by the web layer
        ├── InvalidRequest   422 invalid_request
        ├── Unsupported      422 unsupported
        ├── Unauthorized     401 unauthorized
        ├── NotFound         404 not_found
        ├── Conflict         409 conflict
        ├── PayloadTooLarge  413 payload_too_large
        ├── UnsupportedMediaType  415 unsupported_media_type
        └── RateLimitedApi   429 rate_limited

Job handlers raise `Retry(after=…)` (from relay.queue) to run again later; a ProviderUnavailable /
ArchiveError a handler lets through is turned into a Retry by the worker (using up an attempt). Submits,
polls and archives catch theirs and run again as planned (relay.jobs.context.unavailable_delay, the archive's
own backoff) until the task's deadline or the image link's end, so a provider or source down for a while
does not use up the worker's attempts.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error relay raises on purpose."""


class ProviderError(RelayError):
    """A provider call failed."""

    def __init__(self, message: str, *, code: str = "provider_error", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class ProviderUnavailable(ProviderError):
    """Transient: the provider may answer later (timeouts, connection errors, 5xx)."""

    def __init__(self, message: str, *, retry_after: float | None = None, status: int | None = None,
                 code: str = "provider_unavailable") -> None:
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after


class RateLimited(ProviderUnavailable):
    """The provider said 429; `retry_after` is its requested delay in seconds, if it gave one."""

    def __init__(self, message: str = "rate limited by provider", *, retry_after: float | None = None,
                 status: int | None = 429) -> None:
        super().__init__(message, retry_after=retry_after, status=status, code="rate_limited")


class SubmitOutcomeUnknown(ProviderError):
    """A submit was sent but no answer came back: the provider may have accepted (and billed) it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="submit_outcome_unknown")


class ProviderRejected(ProviderError):
    """Permanent: the provider refused the request (4xx, content policy). Fail the task now."""


class ProviderProtocolError(ProviderUnavailable):
    """The provider answered with a body we could not understand. Retried; recorded."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message, status=status, code="provider_protocol_error")


class ArchiveError(RelayError):
    """Saving an image failed in a way that may succeed later (timeout, truncated body)."""

    status: int | None = None       # the source's HTTP status, when it answered (relay.metrics counts it)

    def __init__(self, message: str, *, code: str = "archive_failed") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class SourceGone(ArchiveError):
    """The image's source is gone for good (expired link, 404/410) or is not a valid image."""

    def __init__(self, message: str, *, code: str = "source_gone") -> None:
        super().__init__(message, code=code)


class InvalidImage(SourceGone):
    """The bytes are not an image we accept (garbage, wrong type, decompression bomb). Permanent."""

    def __init__(self, message: str, *, code: str = "invalid_image") -> None:
        super().__init__(message, code=code)


class ReferenceUnavailable(ArchiveError):
    """A reference image of a task could not be downloaded before its submit (nothing was sent yet).

    Transient causes (timeout, 5xx, connection refused) are retried like any ArchiveError; permanent ones
    (404, too large, an address the SSRF guard refuses) fail the task at once.
    """

    CODE = "reference_unavailable"

    def __init__(self, url: str, reason: str, *, permanent: bool) -> None:
        super().__init__(f"reference image {url} could not be fetched: {reason}", code=self.CODE)
        self.url = url
        self.permanent = permanent


class BlockedAddress(RelayError):
    """The SSRF guard refused an outbound URL (private, loopback, metadata, … address)."""


class ApiError(RelayError):
    """An error with a place in API.md's error shape."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        err: dict[str, object] = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}


class InvalidRequest(ApiError):
    status, code = 422, "invalid_request"


class Unsupported(ApiError):
    status, code = 422, "unsupported"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    """A /v1 body sent with a Content-Type other than JSON (an addition to API.md's codes)."""

    status, code = 415, "unsupported_media_type"


class BadRequestBody(ApiError):
    """Body is not JSON at all. API.md has no 400 code; callbacks answer 400 with invalid_request."""

    status, code = 400, "invalid_request"


class RateLimitedApi(ApiError):
    status, code = 429, "rate_limited"
