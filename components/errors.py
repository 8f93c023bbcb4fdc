"""Errors a user can act on. The CLI prints their message as-is, one line each."""


class UserError(Exception):
    """A problem with the user's input or environment (exit code 1)."""

    exit_code = 1


class ParamsError(UserError):
    """params.yaml does not match the schema (exit code 2)."""

    exit_code = 2


class StorageError(UserError):
    """The object store is unreachable or refused our credentials."""


class ServiceError(UserError):
    """An embedded service could not be started, reached or stopped."""
