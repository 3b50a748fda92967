"""OpenAI's duration format for `x-ratelimit-reset-requests` (api.rate_limit)."""

from __future__ import annotations

import pytest

from api.rate_limit import RateState, duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (0.0121, "13ms"),
        (1.0, "1s"),
        (8.64, "8.64s"),
        (14.5, "14.5s"),
        (59.9996, "1m0s"),
        (60.0, "1m0s"),
        (360.0, "6m0s"),
        (75.25, "1m15.25s"),
    ],
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_headers() -> None:
    assert RateState(limit=40, remaining=3, reset_s=2.5).headers == {
        "x-ratelimit-limit-requests": "40",
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "2.5s",
    }
