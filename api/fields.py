"""Input types the operations share."""

from datetime import datetime, timezone
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime

EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(9000, 1, 1, tzinfo=timezone.utc)


def _within_reason(value: datetime) -> datetime:
    """In UTC, between 1970 and 9000: a date near the ends of Python's range overflows once moved to UTC."""
    try:
        value = value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("the date is out of range") from None
    if not EARLIEST <= value < LATEST:
        raise ValueError("must be between 1970 and 9000")
    return value


Moment = Annotated[AwareDatetime, AfterValidator(_within_reason)]
"""A date and time with its time zone (ISO 8601, e.g. 2026-12-06T10:00:00Z), between 1970 and 9000."""
