"""The API skips the exact prompt count when a cheap bound proves the request fits: the
bound must never be below the real count, or a prompt over the context would get through."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.prompt_bound import PromptBound
from core.config import Settings
from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE
from models.prompts import PromptCounter, load_prompt_counter


@pytest.fixture(scope="module")
def counter(demo_model: Path) -> PromptCounter:
    return load_prompt_counter(
        Settings(model_path=str(demo_model), model_type=DEMO_MODEL_TYPE, template=DEMO_TEMPLATE)
    )


_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300
) | st.sampled_from(
    ["", " ", "\n\n", "<|im_start|>", "<|im_end|>user", "tell me about gpus " * 20, "日本語のテキスト"]
)
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": _TEXT})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(_MESSAGE, min_size=1, max_size=6))
def test_the_bound_is_never_below_the_exact_count(
    counter: PromptCounter, messages: list[dict[str, str]]
) -> None:
    """Where the template refuses a conversation, the bound must not vouch for it either (the
    API's exact count is what answers 400 for it)."""
    upper = PromptBound.measure(counter.count_prompt_tokens)(messages)
    try:
        exact = counter.count_prompt_tokens(messages)
    except Exception:
        assert upper is None, messages
        return
    assert upper is None or upper >= exact


def test_the_bound_is_close_enough_to_decide(counter: PromptCounter) -> None:
    """A bound so loose that it never proves a fit would save nothing."""
    bound = PromptBound.measure(counter.count_prompt_tokens)
    messages = [{"role": "user", "content": "tell me about gpus " * 30}]
    upper = bound(messages)
    assert upper is not None and upper <= 4 * counter.count_prompt_tokens(messages) + 64
