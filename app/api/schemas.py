"""Request and response bodies of the A1111-compatible API and the studio's job API.

Generation requests extend the engine's own request models (``contract/images.py``), so the
API accepts exactly A1111's field names, defaults and bounds plus the fields only A1111's HTTP
layer has (``alwayson_scripts``, ``script_name``...). Response models mirror A1111's so the
OpenAPI page at ``/docs`` describes what its clients already parse.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contract.images import ExtrasRequest, Img2ImgRequest, Txt2ImgRequest
from contract.talking_head import TalkingHeadRequest

API_ONLY_FIELDS = {"script_name", "script_args", "alwayson_scripts", "force_task_id", "infotext"}


class _A1111HttpFields(BaseModel):
    """Fields A1111 adds on top of its processing classes in the HTTP API."""

    script_name: str | None = Field(None, description="A selectable script to run (none are available).")
    script_args: list[Any] = Field(default_factory=list, description="Arguments of script_name.")
    force_task_id: str | None = Field(None, description="Accepted for compatibility; the job id is ours.")
    infotext: str | None = Field(None, description="Accepted for compatibility; ignored.")


class Txt2ImgApiRequest(Txt2ImgRequest, _A1111HttpFields):
    model_config = ConfigDict(extra="ignore", title="StableDiffusionProcessingTxt2Img")

    save_images: bool = Field(False, description="A1111 default for the API; SD Studio always saves.")


class Img2ImgApiRequest(Img2ImgRequest, _A1111HttpFields):
    model_config = ConfigDict(extra="ignore", title="StableDiffusionProcessingImg2Img")

    save_images: bool = Field(False, description="A1111 default for the API; SD Studio always saves.")


class ExtrasSingleImageApiRequest(ExtrasRequest):
    model_config = ConfigDict(extra="ignore", title="ExtrasSingleImageRequest")


class FileData(BaseModel):
    data: str = Field(..., description="Base64 of the file, with or without a data: prefix.")
    name: str = Field(..., max_length=255)


class ExtrasBatchImagesApiRequest(ExtrasRequest):
    model_config = ConfigDict(extra="ignore", title="ExtrasBatchImagesRequest")

    image: str = Field("", description="Unused here: see imageList.")
    imageList: list[FileData] = Field(..., min_length=1, max_length=64)  # noqa: N815 (A1111's name)


class TextToImageResponse(BaseModel):
    images: list[str] | None = Field(None, description="Generated images, base64 PNG with parameters.")
    parameters: dict[str, Any]
    info: str = Field(..., description="JSON-encoded generation info (A1111's processed.js()).")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class PNGInfoRequest(BaseModel):
    image: str = Field(..., description="Base64 image, with or without a data: prefix.")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscalerModeItem(BaseModel):
    name: str


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SDVaeItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    filename: str


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None = None


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None = None
    negative_prompt: str | None = None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]


class OptionsUpdate(BaseModel):
    """``POST /sdapi/v1/options``: the options SD Studio acts on; other keys are ignored."""

    model_config = ConfigDict(extra="ignore", title="Options")

    sd_model_checkpoint: str | None = Field(None, description="Load this checkpoint (title, name or hash).")
    sd_vae: str | None = Field(None, description="'Automatic', 'None' or a VAE from models/VAE.")
    CLIP_stop_at_last_layers: int | None = Field(None, ge=1, le=12)


# --- /studio/v1 -------------------------------------------------------------------------------
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
_UPLOAD_NOTE = "Base64 of the file, as a data: URL or bare. File paths are refused (422)."


class TalkingHeadApiRequest(TalkingHeadRequest):
    """A talking-head job (``mode: talking_head``): the engine's fields, with the files sent inline.

    The server decodes each file, checks it (the portrait must be an image, the speech decodable
    audio), stores it under a name of its own and runs the job on that copy; the copy is removed
    once the job has run.
    """

    model_config = ConfigDict(extra="forbid", title="TalkingHeadJob")

    # Paths in the engine's model; here the files themselves (base64).
    image: str = Field(..., description=f"The portrait (PNG/JPEG/WebP). {_UPLOAD_NOTE}")
    audio: str = Field(..., description=f"The speech (wav, mp3, m4a, flac...). {_UPLOAD_NOTE}")
    ref_eyeblink: str | None = Field(None, description=f"Eye blinks to copy (a video). {_UPLOAD_NOTE}")
    ref_pose: str | None = Field(None, description=f"Head motion to copy (a video). {_UPLOAD_NOTE}")


class JobLinks(BaseModel):
    self: str
    events: str
    images: list[str] = Field(default_factory=list, description="Result images.")
    videos: list[str] = Field(default_factory=list, description="Result videos (talking-head MP4s).")
    sidecars: list[str] = Field(
        default_factory=list, description="JSON records of a video's parameters and timings."
    )


class JobAccepted(BaseModel):
    id: str
    state: JobState
    position: int | None
    links: JobLinks


class JobView(BaseModel):
    id: str
    kind: str
    state: JobState
    position: int | None = Field(None, description="1-based place among waiting jobs.")
    progress: float
    step: int
    steps: int
    eta_seconds: float | None
    message: str
    error: str | None
    info: dict[str, Any] | None
    worker: str | None = Field(None, description="The worker(s) running it now (a spread job: several).")
    attempts: int = Field(0, description="Runs started; more than 1 when a lost worker made it run again.")
    links: JobLinks


class JobList(BaseModel):
    jobs: list[JobView]
