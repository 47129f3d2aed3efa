"""Field checks shared by the bundled plugins' config models, with Kong's messages."""
from __future__ import annotations

from pydantic import AfterValidator

from ringgate.config.schema import kong_error


def one_of(*choices: str) -> AfterValidator:
    """Kong's `one_of` rule: the value must be one of `choices`."""
    listed = ", ".join(choices)

    def check(value: str) -> str:
        if value not in choices:
            raise kong_error(f"expected one of: {listed}")
        return value

    return AfterValidator(check)
