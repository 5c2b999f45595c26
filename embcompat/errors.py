"""The one error tree of embcompat. Every error names what was wrong and how to fix it.

    EmbcompatError (code, http_status, hint, transient)
    ├── Unauthorized                401 (no or unknown bearer token)
    ├── Forbidden                   403 (the token lacks the scope)
    ├── NotFound                    404
    │   ├── UnknownModel
    │   ├── UnknownVersion
    │   ├── UnknownAdapter
    │   ├── UnknownGallery
    │   ├── UnknownItem
    │   └── UnknownJob
    ├── Conflict                    409
    │   ├── DuplicateVersion
    │   ├── DuplicateItem
    │   ├── UpgradeInProgress
    │   └── InvalidTransition
    ├── InvalidInput                422
    │   ├── DimensionMismatch
    │   ├── InvalidVectors          (NaN / Inf / wrong shape)
    │   ├── IncompatibleAdapter     (adapter fitted for another pair of versions)
    │   ├── InsufficientPairs
    │   └── UpgradeRefused          (the plan cannot run, and why)
    ├── EncoderError                (no encoder, or it failed)  422 / 503 when transient
    ├── CorruptArtifact             500 (an index or adapter file failed its checks)
    └── ServiceUnavailable          503 transient (DB, Redis, MLflow unreachable)

Third-party errors (SQLAlchemy, MLflow, FAISS) are translated at the edge that calls them.
"""

from __future__ import annotations

from typing import Any


class EmbcompatError(Exception):
    code: str = "embcompat_error"
    http_status: int = 500
    transient: bool = False

    def __init__(self, message: str, *, hint: str | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.context = context

    def to_problem(self) -> dict[str, Any]:
        """RFC 9457 problem details, with the offending field or id in `context`."""
        problem: dict[str, Any] = {
            "type": f"https://embcompat.dev/errors/{self.code}",
            "title": self.code.replace("_", " "),
            "status": self.http_status,
            "detail": self.message,
            "code": self.code,
        }
        if self.hint:
            problem["hint"] = self.hint
        problem.update({k: v for k, v in self.context.items() if v is not None})
        return problem


class Unauthorized(EmbcompatError):
    code = "unauthorized"
    http_status = 401


class Forbidden(EmbcompatError):
    code = "forbidden"
    http_status = 403


class BodyTooLarge(EmbcompatError):
    code = "body_too_large"
    http_status = 413


class BodyTimeout(EmbcompatError):
    code = "body_timeout"
    http_status = 408


class UntrustedModel(Forbidden):
    code = "untrusted_model"


class NotFound(EmbcompatError):
    code = "not_found"
    http_status = 404


class UnknownModel(NotFound):
    code = "unknown_model"


class UnknownVersion(NotFound):
    code = "unknown_version"


class UnknownAdapter(NotFound):
    code = "unknown_adapter"


class UnknownReport(NotFound):
    code = "unknown_report"


class UnknownTrainingRun(NotFound):
    code = "unknown_training_run"


class UnknownGallery(NotFound):
    code = "unknown_gallery"


class UnknownItem(NotFound):
    code = "unknown_item"


class UnknownJob(NotFound):
    code = "unknown_job"


class UnknownSpace(NotFound):
    """A vector space opened to read that is not on disk (never written, or dropped)."""

    code = "unknown_space"


class Conflict(EmbcompatError):
    code = "conflict"
    http_status = 409


class DuplicateVersion(Conflict):
    code = "duplicate_version"


class DuplicateItem(Conflict):
    code = "duplicate_item"


class UpgradeInProgress(Conflict):
    code = "upgrade_in_progress"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class InvalidInput(EmbcompatError):
    code = "invalid_input"
    http_status = 422


class SearchTooLarge(InvalidInput):
    code = "search_too_large"


class DimensionMismatch(InvalidInput):
    code = "dimension_mismatch"


class InvalidVectors(InvalidInput):
    code = "invalid_vectors"


class IncompatibleAdapter(InvalidInput):
    code = "incompatible_adapter"


class InsufficientPairs(InvalidInput):
    code = "insufficient_pairs"


class UpgradeRefused(InvalidInput):
    code = "upgrade_refused"


class EncoderError(EmbcompatError):
    code = "encoder_error"
    http_status = 422


class CorruptArtifact(EmbcompatError):
    code = "corrupt_artifact"
    http_status = 500


class ServiceUnavailable(EmbcompatError):
    code = "service_unavailable"
    http_status = 503
    transient = True
