"""Annotated dependency aliases: routes declare what they need, the app state provides it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aredis
from celery import Celery
from fastapi import Depends, Request

from api.batch_dispatch import BatchService
from api.fleet import Fleet
from core.config import Settings
from core.job_store import AsyncJobStore
from core.storage import Storage


@dataclass
class AppState:
    settings: Settings
    redis: aredis.Redis
    #: for blocking XREADs: its socket timeout must outlast the block
    stream_redis: aredis.Redis
    store: AsyncJobStore
    celery: Celery
    started_at: int
    storage: Storage
    batches: BatchService
    #: SHA-256 hashes of the keys from INFERQ_API_KEYS
    key_hashes: set[str]
    #: the models live workers serve, and their prompt counters (api.fleet)
    fleet: Fleet


async def get_state(request: Request) -> AppState:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hand-off per request
    state: AppState = request.app.state.inferq
    return state


StateDep = Annotated[AppState, Depends(get_state)]
