"""OpenAI Files and Batches shapes (what the official SDK parses)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from schemas.openai import Metadata, StrictModel
from schemas.structured import omitted_if_none


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = omitted_if_none()


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False
    first_id: str | None = omitted_if_none()
    last_id: str | None = omitted_if_none()


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreate(StrictModel):
    """Body of POST /v1/batches."""

    input_file_id: str
    endpoint: Literal["/v1/chat/completions"]
    completion_window: Literal["24h"]
    metadata: Metadata | None = None
    output_expires_after: dict[str, object] | None = None


BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = omitted_if_none()
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = omitted_if_none()
    error_file_id: str | None = omitted_if_none()
    created_at: int
    in_progress_at: int | None = omitted_if_none()
    expires_at: int | None = None
    finalizing_at: int | None = omitted_if_none()
    completed_at: int | None = omitted_if_none()
    failed_at: int | None = omitted_if_none()
    expired_at: int | None = omitted_if_none()
    cancelling_at: int | None = omitted_if_none()
    cancelled_at: int | None = omitted_if_none()
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None
    #: Our extension: the batch this one retries, if any.
    retry_of: str | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = omitted_if_none()
    last_id: str | None = omitted_if_none()
    has_more: bool = False
