"""The user-facing errors of tilenorm-bmz.

Every error that a user's input causes (a file that is not what it claims, code that would need trust, a
package that fails its integrity checks, data that a command cannot use) is a :class:`TilenormError`. Its
message says what was wrong and what to change; the CLI prints it as one line and exits with 2, without a
traceback. Anything else that escapes is a bug and keeps its traceback.

The subclasses also derive from ``ValueError`` so that library callers that caught ``ValueError`` before
keep working.
"""

from __future__ import annotations

__all__ = ["IntegrityError", "TilenormError", "TrustError"]


class TilenormError(Exception):
    """An error caused by the user's input or files; the message says what to change (CLI: exit 2)."""


class TrustError(TilenormError, ValueError):
    """Running this would execute code that a file carries, and the user did not pass ``--trust-code``."""


class IntegrityError(TilenormError, ValueError):
    """A package or archive fails its integrity checks (unsafe member names, sizes, sha256 mismatches)."""
