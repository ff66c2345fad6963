"""The one exception type for mistakes in a user's input.

Library modules raise ``UserError`` with a neutral message (the value and what was expected, in the
library's own terms); ``dtl_jax.config`` raises it naming config keys. The CLI prints any ``UserError`` as
one line ``dtl-jax: error: ...`` and exits with code 2, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2, no traceback."""

    def __str__(self) -> str:  # one line, whatever the user typed
        return " ".join(super().__str__().splitlines())
