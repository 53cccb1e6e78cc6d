"""Fuzz the running server from its own OpenAPI schema (schemathesis): no 5xx, and it stays up.

Bounded: at most ``MAX_EXAMPLES`` requests and ``TIME_LIMIT`` seconds, loopback only. Cheap
routes get schema-valid and schema-breaking requests; the generation routes get only requests our
own request models reject (a valid random request would start a real, possibly huge, job).
Routes that change server state (model switch, unload, interrupt) get only invalid requests.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError
from schemathesis import GenerationMode

from app.api.schemas import (
    ExtrasBatchImagesApiRequest,
    ExtrasSingleImageApiRequest,
    Img2ImgApiRequest,
    OptionsUpdate,
    Txt2ImgApiRequest,
)
from app.api.studio_routes import JobBody
from tests.api.conftest import API_USERS, StudioServer

MAX_EXAMPLES = 150
TIME_LIMIT = 90.0
GUARDED_BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/sdapi/v1/txt2img"): Txt2ImgApiRequest,
    ("POST", "/sdapi/v1/img2img"): Img2ImgApiRequest,
    ("POST", "/sdapi/v1/extra-single-image"): ExtrasSingleImageApiRequest,
    ("POST", "/sdapi/v1/extra-batch-images"): ExtrasBatchImagesApiRequest,
    ("POST", "/studio/v1/jobs"): TypeAdapter(JobBody),
    ("POST", "/sdapi/v1/options"): OptionsUpdate,
}
STATE_CHANGING = r"^/sdapi/v1/(interrupt|skip|unload-checkpoint|reload-checkpoint)$"


def would_be_accepted(model: Any, body: Any) -> bool:
    try:
        if isinstance(model, type) and issubclass(model, BaseModel):
            model.model_validate(body)
        else:
            model.validate_python(body)
    except (ValidationError, ValueError, TypeError):
        return False
    return True


def test_fuzzing_finds_no_server_errors(studio_server: StudioServer) -> None:
    auth = ("alice", API_USERS["alice"])
    schema = schemathesis.openapi.from_url(studio_server.url + "/openapi.json", auth=auth, timeout=30)
    guarded = "|".join(path for _, path in GUARDED_BODIES)
    cheap = schema.exclude(path_regex=f"^({guarded})$").exclude(path_regex=STATE_CHANGING)
    risky = schema.include(path_regex=f"^({guarded})$|{STATE_CHANGING}")
    strategy = st.one_of(
        cheap.as_strategy(GenerationMode.POSITIVE),
        cheap.as_strategy(GenerationMode.NEGATIVE),
        risky.as_strategy(GenerationMode.NEGATIVE),
    )
    session = requests.Session()
    session.auth = auth
    deadline = time.monotonic() + TIME_LIMIT
    sent: Counter[str] = Counter()
    failures: list[str] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def exercise(case: Any) -> None:
        if time.monotonic() > deadline:
            return
        key = (case.method.upper(), case.operation.path)
        model = GUARDED_BODIES.get(key)
        if model is not None and would_be_accepted(model, case.body):
            return
        try:
            response = case.call(base_url=studio_server.url, session=session, timeout=60)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError):
            return  # the client library cannot even send this request
        sent[f"{key[0]} {key[1]}"] += 1
        if response.status_code >= 500 or "Traceback" in response.text:
            failures.append(f"{key[0]} {key[1]} -> {response.status_code}: {response.text[:300]}")

    exercise()
    assert not failures, "\n".join(failures)
    assert sum(sent.values()) >= 50 and len(sent) >= 15, sent
    assert session.get(studio_server.url + "/studio/v1/health", timeout=30).status_code == 200
