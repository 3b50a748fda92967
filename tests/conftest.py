"""Fixtures for both kinds of test, and the rule that the folder is the kind:

- tests/unit/: no Valkey/Redis, Celery or API processes (pure functions, or the engine in
  this process on the tiny model);
- tests/integration/: real Valkey (or the Redis named by INFERQ_TEST_REDIS_URL), real Celery
  worker processes running the real ms-swift engine on a tiny random model, the real API
  under uvicorn, Flower; their fixtures are in tests/integration/conftest.py. Everything
  there is marked `integration`: `pytest -m integration` / `-m "not integration"`.

Helpers that are not fixtures live in tests/support/."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.demo import build_demo_model

INTEGRATION = Path(__file__).resolve().parent / "integration"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, made to never emit EOS or <|endoftext|> (via its generation_config, which both
    ms-swift and plain transformers honour): every generation runs to `max_tokens` or a
    stop sequence, so cancel and streaming tests have long generations to work with."""
    path = build_demo_model(tmp_path_factory.mktemp("model") / "tiny-qwen2")
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(path)
    # <|endoftext|> (pad) is a template stop word too
    GenerationConfig(
        suppress_tokens=[tok.eos_token_id, tok.pad_token_id], eos_token_id=tok.eos_token_id
    ).save_pretrained(path)
    return path
