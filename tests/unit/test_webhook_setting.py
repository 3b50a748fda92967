"""INFERQ_WEBHOOKS is checked when the settings are read: a typo stops the process at start
instead of leaving an endpoint that never hears anything."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.config import Settings
from core.webhooks import configured_endpoints

SECRET = "whsec_" + "A" * 32


def test_a_good_entry_becomes_an_endpoint_with_a_stable_id() -> None:
    entry = {"url": "https://hooks.example.com/x", "secret": SECRET, "events": ["batch.completed"]}
    first = configured_endpoints(Settings(webhooks=[entry]))  # type: ignore[list-item]
    again = configured_endpoints(Settings(webhooks=[entry]))  # type: ignore[list-item]
    assert [e.id for e in first] == [e.id for e in again] and first[0].id.startswith("we_cfg_")
    assert first[0].events == ["batch.completed"]


@pytest.mark.parametrize(
    "entry, word",
    [
        ({"url": "https://h/x", "secret": SECRET, "events": ["batch.done"]}, "unknown event type"),
        ({"url": "https://h/x", "secret": "s3cret"}, "secret"),
        ({"url": "ftp://h/x", "secret": SECRET}, "url"),
        ({"secret": SECRET}, "url"),
        ({"url": "https://h/x", "secret": SECRET, "event": ["batch.completed"]}, "event"),
    ],
)
def test_a_bad_entry_is_refused_by_name(entry: dict[str, object], word: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Settings(webhooks=[entry])  # type: ignore[list-item]
    assert word in str(exc.value)
