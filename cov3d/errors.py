"""The one exception type for expected, user-fixable problems."""


class Cov3dError(Exception):
    """Bad input or setup that the user can fix; the CLI shows its message as one line."""


def describe_error(error: BaseException) -> str:
    """A one-line reason for a per-scan failure: our own message, else the exception type and text."""
    return str(error) if isinstance(error, Cov3dError) else f"{type(error).__name__}: {error}"
