"""One error type for everything the user can cause or see; each carries its exit code.

Third-party and OS errors are translated into these where they enter, so the CLI can print
one line and exit with a meaningful status instead of a traceback.
"""


class MigrateError(Exception):
    """A failure to report to the user as one line."""

    exit_code = 1


class InvalidInput(MigrateError):
    """Malformed names, options or arguments."""

    exit_code = 2


class NotFound(MigrateError):
    """An unknown container, image, snapshot or host."""

    exit_code = 3


class Conflict(MigrateError):
    """The request clashes with current state: duplicate name, image in use, wrong state."""

    exit_code = 4


class ImageError(MigrateError):
    """An image archive that is corrupt, truncated or malicious."""

    exit_code = 5


class CriuError(MigrateError):
    """CRIU is missing or a dump/restore failed; the message quotes CRIU's own error lines.

    `log` is the CRIU log of the failed operation `op` (dump, restore, lazy-pages), named at the
    end of the message; runtime.criulogs.keep_failed swaps it for a copy that outlives clean-up.
    `detail` is the message without it.
    """

    exit_code = 6

    def __init__(self, message: str, log=None, op: str | None = None):
        super().__init__(message if log is None else f"{message} (CRIU log: {log})")
        self.detail = message
        self.log = log
        self.op = op


class RemoteError(MigrateError):
    """The other host could not be reached, refused us, or failed a step."""

    exit_code = 7


class PeerLost(RemoteError):
    """The connection or the process at the other end went away mid-request: whether the
    request took effect there is unknown until someone asks again."""


class MigrationFailed(MigrateError):
    """A migration failed and was rolled back: the container runs on the source again."""

    exit_code = 8


class InDoubt(MigrateError):
    """A migration lost the answer to its commit and could not ask the target again: the
    container is held frozen here until `migrate recover` learns which copy is the one."""

    exit_code = 9


class DrainIncomplete(MigrateError):
    """`migrate drain` left containers on the host: refused by every target, failed, in doubt."""

    exit_code = 10


def error_for(exit_code: int, message: str) -> MigrateError:
    """The error to raise for a failure another process (shim, agent) reported with its exit code."""
    for cls in (InvalidInput, NotFound, Conflict, ImageError, CriuError, RemoteError, MigrationFailed):
        if cls.exit_code == exit_code:
            return cls(message)
    return MigrateError(message)
