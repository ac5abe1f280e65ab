"""The one exception type for expected, user-fixable problems."""


class Cov3dError(Exception):
    """Bad input or setup that the user can fix; the CLI shows its message as one line."""
