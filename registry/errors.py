"""Typed errors of the registry. The API maps them to CONTRACT §3 (400 invalid_request_error + code)."""

from __future__ import annotations


class DeltaError(ValueError):
    """A delta (LoRA directory, 1-bit delta file, fine-tune) that cannot be served on this base.

    code: "adapter_mismatch" (does not fit the base, or uses an unsupported option) or
          "unsupported_format" (pickle, unknown or malformed file format).
    param: the file or tensor at fault, when there is one.
    """

    def __init__(self, message: str, *, code: str = "adapter_mismatch", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class AdapterMismatch(DeltaError):
    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, code="adapter_mismatch", param=param)


class UnsupportedFormat(DeltaError):
    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, code="unsupported_format", param=param)


class PickleRefused(UnsupportedFormat):
    """A pickle file (by its name or its first bytes): never loaded, whatever the format around it."""


# File names torch.save / pickle write (pytorch_model.bin, adapter_model.bin, *.pt, ...): refused by name
# (safetensors_io also refuses pickle by a file's first bytes, whatever its name).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def is_pickle_name(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


class RegistryError(Exception):
    """An error of the registry's catalog or uploads that the caller made (not a bug), with the contract's
    `param` (the request field at fault, or None). Subclasses say which CONTRACT §3 row applies; the
    registry itself knows nothing of HTTP.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidName(RegistryError):
    """A tenant, adapter or file name that is not allowed (400 invalid_request_error)."""


class NameTaken(RegistryError):
    """The name exists already (409 conflict_error)."""


class NotFound(RegistryError):
    """No such tenant or adapter -- or one that belongs to another tenant: the two are never
    distinguished (404 not_found_error)."""


class NotStored(RegistryError):
    """The version exists, but what was asked of its stored data cannot be given: a fine-tune whose upload was
    not kept (stored before deltaserve kept them, or lost), or kept against another base than the one served
    (409 conflict_error, code "not_stored")."""


class UploadTooLarge(RegistryError):
    """An upload over its size limit (413 invalid_request_error); what was written has been deleted."""


class InsufficientStorage(RegistryError):
    """The registry's disk is full, or the tenant's storage quota is (507 server_error insufficient_storage).
    Nothing stored is harmed: the write that did not fit is undone."""


def is_disk_full(e: BaseException) -> bool:
    """True for the errors a full disk or quota raises: ENOSPC / EDQUOT, SQLite's SQLITE_FULL, PostgreSQL's
    disk_full (SQLSTATE 53100); a database error wrapped by SQLAlchemy is looked at inside (`.orig`)."""
    import errno
    import sqlite3

    e = getattr(e, "orig", None) or e
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if getattr(e, "sqlstate", None) == "53100":
        return True
    return isinstance(e, sqlite3.OperationalError) and "full" in str(e).lower()
