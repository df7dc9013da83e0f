"""The errors a user can fix, in one light module.

Each is printed by the CLI as one line (`anomon: error: ...`, exit status 2), never a traceback.
They live here, apart from the modules that raise them, so the CLI can catch them without
importing torch or scikit-learn just to name an exception class.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


class BundleError(UserError):
    """A model bundle that cannot be used: missing, unreadable, corrupt, tampered, or too new."""


class CalibrationError(UserError, ValueError):
    """Too few or unusable calibration scores."""


class ConfigError(UserError):
    """Invalid configuration; the message names the field and the reason."""


# Every reason an image can be refused. Kept small and fixed: it is a metric label.
REASONS: tuple[str, ...] = (
    "empty",  # zero bytes
    "truncated",  # a valid header but the data stops early
    "corrupt",  # recognised format, undecodable data
    "not_image",  # not an image format Pillow knows
    "too_large",  # over the pixel or byte limit (decompression bombs included)
    "unreadable",  # permission denied, I/O error, a directory
    "vanished",  # deleted between the event and the read
    "refused",  # outside the watched folders, or a symlink leading out
)


class ImageError(UserError):
    """An image that cannot be scored; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str, *, errno: int | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.errno = errno  # the OS error behind an "unreadable", so callers can tell transient ones


class StartupError(UserError):
    """The daemon cannot start; one line for the user."""
