"""Domain errors and their mapping onto gRPC status codes.

Service code raises these; one server interceptor (see ``interceptor.py``) turns them into a
canonical status code with a ``google.rpc.Status`` carrying ``ErrorInfo{reason, domain, metadata}``
(AIP-193). Anything else becomes INTERNAL with a generic message; the details go to the log.
"""
from __future__ import annotations

import re
from pathlib import Path

import grpc

#: ErrorInfo.domain for every error latentwire raises.
ERROR_DOMAIN = "latentwire.dev"


class LatentwireError(Exception):
    """An error a caller can act on: a status code, a stable UPPER_SNAKE reason, a message saying what to fix."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        #: When set, the status also carries google.rpc.RetryInfo: how long to wait before retrying.
        self.retry_after_s = retry_after_s


class InvalidArgument(LatentwireError):
    """The request is malformed or out of range; retrying it unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(LatentwireError):
    """A named resource (model, job) does not exist on this service."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class FailedPrecondition(LatentwireError):
    """The service is not in a state to do this (for example the model is still loading)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(LatentwireError):
    """A limit was hit (too many jobs, too large a request); retry later or ask for less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(LatentwireError):
    """A stage this service depends on cannot be reached; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "STAGE_UNAVAILABLE"


class Cancelled(LatentwireError):
    """The caller cancelled the job."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class DeadlineExceeded(LatentwireError):
    """The caller's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Aborted(LatentwireError):
    """The call lost a concurrency race (an upload whose lease lapsed); retry from the current state."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class AlreadyExists(LatentwireError):
    """The resource the caller tried to create (a model name) exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class DataLoss(LatentwireError):
    """Stored or transferred bytes no longer match their digest: unrecoverable corruption."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class Unauthenticated(LatentwireError):
    """The call carries no valid credentials (a missing or unknown bearer token)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(LatentwireError):
    """The caller is known but may not do this (its token lacks the method's scope)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unimplemented(LatentwireError):
    """This service does not implement the method (a stub of a generated servicer, such as grpc's Health/List)."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class ModelFolderError(FailedPrecondition):
    """A model folder this service cannot load: files missing, pickle-only weights, the wrong kind of model.

    At start the process ends with it, naming the folder for the operator (``str(error)``); when a
    request loads a model on demand (a registry model), the call gets FAILED_PRECONDITION and the
    service keeps serving. The caller's message (``error.message``) names the model, never the
    server's path.
    """

    default_reason = "MODEL_FOLDER_INVALID"

    def __init__(self, folder: str | Path, problem: str, *, model: str | None = None):
        what = f"model {quote(model)}" if model else "the model folder"
        super().__init__(f"{what} cannot be loaded: {problem}", metadata={"model": model} if model else None)
        self.folder = Path(folder)
        self.problem = problem

    def for_model(self, model: str) -> ModelFolderError:
        """The same problem, its message naming the model a request asked for."""
        return ModelFolderError(self.folder, self.problem, model=model)

    def __str__(self) -> str:
        return f"{self.folder}: {self.problem}"


class ConfigurationError(FailedPrecondition):
    """A service's own settings cannot work (a flag, a certificate or token file, a device this host lacks).

    At start, ``services.runtime.server.run`` turns it into one "error: ..." line and exit status 2;
    should a request ever meet one (a model loaded on demand on a backend this host lacks), the call
    gets FAILED_PRECONDITION and the service keeps serving.
    """

    default_reason = "SERVICE_MISCONFIGURED"


class Internal(LatentwireError):
    """A failure inside latentwire; the caller sees a generic message, the log has the details."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Unavailable, Cancelled, DeadlineExceeded,
                AlreadyExists, DataLoss, Unauthenticated, PermissionDenied, Unimplemented)
}


#: Characters of caller input a message may echo.
QUOTE_LIMIT = 40


def quote(text: object, limit: int = QUOTE_LIMIT) -> str:
    """Caller input for a message: quoted, and cut to its first ``limit`` characters ("..." marks a cut).

    Messages echo at most this much of what a caller sent, so an error never replays a whole prompt
    or a megabyte of bytes back.
    """
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + "..."


#: Most UTF-8 bytes of a status message, and of one ErrorInfo metadata key and value; most metadata entries.
#: A status travels in trailers (grpc-message percent-encoded, grpc-status-details-bin in base64), which
#: grpc bounds at 8 KiB by default: beyond it the caller gets RESOURCE_EXHAUSTED instead of the error.
MAX_MESSAGE_BYTES = 1000
MAX_METADATA_KEY_BYTES = 40
MAX_METADATA_VALUE_BYTES = 100
MAX_METADATA_ENTRIES = 8

#: An object's repr: "<_io.BytesIO object at 0x7f...>", "<class 'x.Y'>", "<function f at 0x...>",
#: "<module 'm' from '/p'>".
_OBJECT_REPR = re.compile(r"<(?:[^<>\n]{0,200}? at 0x[0-9a-fA-F]+|class '[^'\n]{0,200}'"
                          r"|module '[^'\n]{0,200}'[^<>\n]{0,300}|(?:bound |built-in )?(?:method|function) [^<>\n]{0,200})>")
#: A bare heap address (what is left of a repr cut by an earlier truncation).
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{8,}\b")
#: A network address of a peer (grpc's "ipv4:10.0.0.7:50052", an IPv4 address with or without a port, a
#: bracketed IPv6 address with a port): where the suite's parts run is for operators, not callers.
_NETWORK_ADDRESS = re.compile(r"(?:\b(?:ipv4|ipv6|unix|dns):)?(?:\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b"
                              r"|\[[0-9A-Fa-f]*:[0-9A-Fa-f:.]*\](?::\d{1,5})?)")
#: An absolute path of at least two parts (POSIX, home-relative or Windows), not inside a URL or a word.
_PATH = re.compile(r"(?<![\w.:/~\\-])(?:~?(?:/[\w.@+=,-]+){2,}/?|[A-Za-z]:\\(?:[\w.@+=, -]+\\?){1,})")
#: A gRPC method name (/package.Service/Method) looks like a path but says nothing about the server.
_METHOD = re.compile(r"/\w+(?:\.\w+)+/\w+")


def _hide_path(match: re.Match) -> str:
    return match.group(0) if _METHOD.fullmatch(match.group(0)) else "<path>"


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (never inside a character), "..." marking a cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data.decode("utf-8")
    return data[:limit - 3].decode("utf-8", "ignore") + "..."


def sanitize_message(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """A message fit to send a caller: object reprs, heap addresses, network addresses and absolute paths
    replaced, at most ``limit`` UTF-8 bytes.

    The one net under every status (interceptor.to_status); sources still say things in their own words.
    """
    text = str(text)[:4 * limit]  # the scrubbing below never looks at more than what can be sent
    text = _OBJECT_REPR.sub("<object>", text)
    text = _ADDRESS.sub("0x...", text)
    text = _NETWORK_ADDRESS.sub("<address>", text)
    text = _PATH.sub(_hide_path, text)
    return _cut(text, limit)


def sanitize_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """ErrorInfo metadata fit to send: at most MAX_METADATA_ENTRIES entries, keys and values bounded and
    scrubbed as messages are."""
    return {_cut(str(key), MAX_METADATA_KEY_BYTES): sanitize_message(str(value), MAX_METADATA_VALUE_BYTES)
            for key, value in list(metadata.items())[:MAX_METADATA_ENTRIES]}


def from_rpc_error(error: grpc.RpcError, stage: str) -> LatentwireError:
    """Turn a downstream stage's RpcError into the matching domain error, keeping its message and reason.

    Connection failures become UNAVAILABLE naming the stage; codes a caller cannot act on become INTERNAL.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    reason = None
    metadata = {"stage": stage}
    info = error_info_of(error)
    if info is not None:
        reason = info.reason
        metadata.update(dict(info.metadata))
    cls = _BY_CODE.get(code)
    if cls is None:
        return Internal(f"the {stage} stage failed", reason="STAGE_FAILED", metadata=metadata)
    if metadata["stage"] != stage:
        # The error started further down (the ControlNet service behind the denoiser): its message already
        # names that stage, and blaming the one in between would send the reader to the wrong place.
        return cls(details, reason=reason, metadata=metadata)
    if cls is Unavailable:  # the stage's own reason kept: SHUTTING_DOWN tells the orchestrator to wait for it
        return Unavailable(f"the {stage} stage is unavailable: {details}", reason=reason, metadata=metadata)
    return cls(f"{stage}: {details}", reason=reason, metadata=metadata)


def error_info_of(error: grpc.RpcError):
    """Return the google.rpc.ErrorInfo attached to an RpcError, or None."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
