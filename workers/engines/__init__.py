"""The concrete engines behind `workers.engine.Engine`, and the one place that picks one.

Each module here imports torch and ms-swift; only a worker's pool child imports this
package (`load_engine`), never the Celery parent or the API.
"""

from __future__ import annotations

from core.config import Settings
from models.prompts import root_log_levels_kept
from models.spec import resolve_model
from workers.engine import Engine


def load_engine(settings: Settings) -> Engine:
    if settings.engine == "echo":
        from workers.engines.echo import EchoEngine

        return EchoEngine(settings.model_id, oom_above=settings.echo_oom_above)
    with root_log_levels_kept():
        if settings.engine_mode == "continuous":
            from workers.engines.continuous import SwiftContinuousEngine

            return SwiftContinuousEngine(resolve_model(settings), settings)
        from workers.engines.swift import SwiftEngine

        return SwiftEngine(resolve_model(settings), settings)
