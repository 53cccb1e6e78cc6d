"""Messages between the head (the job queue) and a worker, one JSON object each.

Head -> worker: :class:`RunJob`, :class:`ControlJob`, :class:`SetDefaultModel`, :class:`Shutdown`.
Worker -> head: :class:`WorkerReady`, :class:`JobEventMessage`, :class:`ArtifactMessage`,
:class:`JobFinished`, :class:`StateMessage`. Requests travel as their JSON dump and are validated
again on arrival, so a worker on another machine needs only this package to understand a job.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from contract.artifacts import Artifact, JobOutcome
from contract.events import JobProgress, WorkerState
from contract.talking_head import TalkingHeadStage


class InlineFile(BaseModel):
    """An input file of the request sent with it, for a worker on another PC: the worker saves it in
    its scratch folder and points ``request[request_field]`` there."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    request_field: str
    name: str = Field(min_length=1, max_length=255)
    data: bytes = Field(repr=False)


class RunJob(BaseModel):
    type: Literal["run"] = "run"
    job_id: str
    request: dict[str, Any]
    attempt: int = 1
    preview_mode: Literal["auto", "taesd", "cheap", "none"] = "auto"
    preview_every: int = Field(1, ge=1)
    stage: TalkingHeadStage | None = Field(
        None, description="Run one part of a talking head split over workers instead of the whole job."
    )
    files: list[InlineFile] = Field(default_factory=list, description="Input files sent with the job.")
    warmup: bool = Field(False, description="A warm-up run for the cost model: its images are not sent back.")


class ControlJob(BaseModel):
    type: Literal["control"] = "control"
    job_id: str
    action: Literal["interrupt", "skip"]


class SetDefaultModel(BaseModel):
    """Make ``checkpoint`` the model used when a job names none; ``load`` loads it now (the worker
    answers with a :class:`StateMessage`)."""

    type: Literal["set_default_model"] = "set_default_model"
    checkpoint: str | None
    load: bool = False
    unload: bool = Field(False, description="Free the loaded checkpoints first.")
    request_id: str = Field("", description="Echoed in ``WorkerState.answered`` once done.")


class Shutdown(BaseModel):
    type: Literal["shutdown"] = "shutdown"


class WorkerReady(BaseModel):
    type: Literal["ready"] = "ready"
    state: WorkerState


class JobEventMessage(BaseModel):
    type: Literal["event"] = "event"
    job_id: str
    progress: JobProgress


class ArtifactMessage(BaseModel):
    type: Literal["artifact"] = "artifact"
    job_id: str
    artifact: Artifact


class JobFinished(BaseModel):
    type: Literal["finished"] = "finished"
    job_id: str
    outcome: JobOutcome


class StateMessage(BaseModel):
    type: Literal["state"] = "state"
    state: WorkerState


HeadMessage = Annotated[RunJob | ControlJob | SetDefaultModel | Shutdown, Field(discriminator="type")]
WorkerMessage = Annotated[
    WorkerReady | JobEventMessage | ArtifactMessage | JobFinished | StateMessage, Field(discriminator="type")
]
HEAD_MESSAGES: TypeAdapter[Any] = TypeAdapter(HeadMessage)
WORKER_MESSAGES: TypeAdapter[Any] = TypeAdapter(WorkerMessage)


def encode_message(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()


def decode_head_message(data: bytes) -> RunJob | ControlJob | SetDefaultModel | Shutdown:
    return HEAD_MESSAGES.validate_json(data)


def decode_worker_message(
    data: bytes,
) -> WorkerReady | JobEventMessage | ArtifactMessage | JobFinished | StateMessage:
    return WORKER_MESSAGES.validate_json(data)
