"""Errors a user can act on. The CLI and the stages print their message as-is, one line
each; :func:`expected_failure` gives the outside world's failures the same one line."""


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


def expected_failure(exc: Exception) -> str | None:
    """One line for a service that cannot be reached or refuses us, or a file we cannot
    use; None for anything else (a bug, which keeps its traceback)."""
    import httpx

    if isinstance(exc, httpx.TransportError):
        try:
            url = exc.request.url
            where = f"{url.scheme}://{url.host}:{url.port}"
        except RuntimeError:  # raised without its request
            where = "a service"
        return (f"cannot reach {where} ({type(exc).__name__}: {exc or 'no answer'}); is it running? "
                "(`aligndiff status`)")
    if type(exc).__module__.startswith("label_studio_sdk") and hasattr(exc, "status_code"):
        hint = {401: "check LABEL_STUDIO_API_KEY in .env", 403: "check LABEL_STUDIO_API_KEY in .env",
                404: "it may have been deleted in Label Studio"}.get(exc.status_code, "see its log")
        return f"Label Studio answered HTTP {exc.status_code}: {str(getattr(exc, 'body', ''))[:160]}; {hint}"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return None
