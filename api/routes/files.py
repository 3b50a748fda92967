"""OpenAI Files API (purpose=batch)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api import file_store as files
from api.auth import OwnerDep, ScopeDep
from api.deps import StateDep
from api.errors import error_responses
from schemas.batches import FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post(
    "", response_model=FileObject, summary="Upload a batch input file", responses=error_responses(400, 413)
)
async def upload_file(
    st: StateDep, owner: OwnerDep, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
) -> FileObject:
    return await files.upload(st.redis, st.storage, st.settings, file, purpose, owner)


@router.get("", response_model=FileList, summary="List files", responses=error_responses(400))
async def list_files(
    st: StateDep,
    scope: ScopeDep,
    after: Annotated[str | None, Query(description="A file id: the page after it")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query(description="By created_at")] = "desc",
    purpose: Annotated[str | None, Query(description="Only files of this purpose")] = None,
) -> FileList:
    page = await files.list_files(st.redis, limit, scope, after=after, order=order, purpose=purpose)
    data = page.data
    return FileList(
        data=data,
        has_more=page.has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{file_id}", response_model=FileObject, summary="Get a file", responses=error_responses(404))
async def get_file(file_id: str, st: StateDep, scope: ScopeDep) -> FileObject:
    return (await files.get(st.redis, file_id, scope))[0]


@router.get("/{file_id}/content", summary="Download a file's content", responses=error_responses(404))
async def file_content(file_id: str, st: StateDep, scope: ScopeDep) -> StreamingResponse:
    body = await files.content(st.redis, st.storage, file_id, scope)
    return StreamingResponse(body, media_type="application/jsonl")


@router.delete(
    "/{file_id}", response_model=FileDeleted, summary="Delete a file", responses=error_responses(404)
)
async def delete_file(file_id: str, st: StateDep, scope: ScopeDep) -> FileDeleted:
    await files.delete(st.redis, st.storage, file_id, scope)
    return FileDeleted(id=file_id)
