# ruff: noqa: F811 (pytest fixtures imported below are requested by parameters of the same name)
"""Jobs on a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, token auth
on, CPU workers over the tiny offline models): a job runs on a worker actor and equals the same job
in-process byte for byte; a node that dies mid-job has its job requeued and finished on the other
node, one set of outputs; a PC with a wrong token is refused with our message, not Ray's
ConnectionError twenty seconds later; a talking head is rendered by both PCs (motion on one, frame
ranges on both) and equals the one-worker render. The nodes' Python processes start with
``tests/cluster_shims`` on their path, which swaps in the cheap stand-in face generator.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.cluster.security import auth_environment
from app.services import StudioServices
from app.settings import StudioSettings
from contract.images import Txt2ImgRequest
from contract.talking_head import TalkingHeadRequest
from tests.sadtalker.conftest import astronaut_png, media_dir, sadtalker_models_root, speech_wav  # noqa: F401
from tests.sadtalker.helpers import decode_frames, one_worker_render, probe

TOKEN = "0123456789abcdef" * 4
# Ray reads its auth mode once, when it is first imported: set it before anything imports ray.
os.environ.update(auth_environment(TOKEN))
if importlib.util.find_spec("ray") is None:
    pytest.skip("ray is not installed (requirements-cluster.txt)", allow_module_level=True)
import ray  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
JOB = {"width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}
HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


SHIMS = ROOT / "tests" / "cluster_shims"


def node_env(root: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(SHIMS)]), "SDSTUDIO_NODE_ROOT": str(root)}


@pytest.fixture(scope="module")
def cluster(
    tiny_models_root: Path, sadtalker_models_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A head node and one more node, each with one worker slot and its own models/ copy."""
    from ray.cluster_utils import Cluster

    work = tmp_path_factory.mktemp("cluster")
    roots = []
    for name in ("head-pc", "second-pc"):
        root = work / name
        shutil.copytree(tiny_models_root, root / "models", symlinks=True)
        shutil.copytree(sadtalker_models_root / "SadTalker", root / "models" / "SadTalker")
        roots.append(root)
    # The second PC lacks the default checkpoint: its first job copies it from the head.
    for name in ("tiny-sd1.safetensors", "tiny-sd1.yaml"):
        (roots[1] / "models" / "Stable-diffusion" / name).unlink()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"sdstudio_worker": 1},
            "env_vars": node_env(roots[0]),
            "_system_config": HEALTH,
        },
    )
    second = cluster.add_node(num_cpus=1, resources={"sdstudio_worker": 1}, env_vars=node_env(roots[1]))
    (work / "data").mkdir()
    (work / "data" / "cluster_token").write_text(TOKEN)
    settings = StudioSettings(
        models_dir=tiny_models_root,
        data_dir=work / "data",
        outputs_dir=work / "outputs",
        default_checkpoint="tiny-sd1",
        cluster_address=cluster.address,
        talking_head_split_seconds=0,  # the test speech is 1.5 s
    )
    services = StudioServices.create(settings)
    queue = services.start_queue()
    deadline = time.monotonic() + 600
    while len(queue.workers.idle()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        yield {"cluster": cluster, "services": services, "second": second, "work": work, "roots": roots}
    finally:
        queue.stop()
        ray.shutdown()
        cluster.shutdown()


def test_a_job_runs_on_a_worker_actor_and_equals_the_local_run(
    cluster: dict[str, Any], studio: StudioServices
) -> None:
    services: StudioServices = cluster["services"]
    states = services.workers.states()
    assert len(states) == 2 and all(state.kind == "ray" and state.alive for state in states), states
    request = Txt2ImgRequest(prompt="same bytes on any PC", steps=3, batch_size=2, **JOB)
    local = studio.executor.execute(request)
    job = services.queue.submit(request, owner="cluster")
    status = services.queue.wait(job, timeout=600)
    assert status.state == "done", status.error
    assert [Path(p).read_bytes() for p in status.images] == [img.path.read_bytes() for img in local.images]
    assert all(
        Path(p).is_relative_to(cluster["work"] / "outputs") for p in status.images
    )  # written by the head
    # Each worker ran a warm-up while the queue was empty: the cost model measured both PCs (plus
    # this job), and the warm-ups left no job and no file behind.
    deadline = time.monotonic() + 600
    while services.queue.cost_model.runs() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert services.queue.cost_model.runs() >= 3
    assert [record.id for record in services.queue.store.list(limit=10)] == [job]
    assert len(list((cluster["work"] / "outputs").rglob("*.png"))) == len(status.images)


def test_a_batch_count_spread_over_two_pcs_equals_the_one_worker_run(
    cluster: dict[str, Any], studio: StudioServices
) -> None:
    """Four batches of two images: the batches run on both PCs at once, and every image (seed
    11..18) equals the same job run by one worker in this process, byte for byte."""
    services: StudioServices = cluster["services"]
    request = Txt2ImgRequest(prompt="spread me", steps=3, n_iter=4, batch_size=2, **JOB)
    local = studio.executor.execute(request)
    job = services.queue.submit(request, owner="spread")
    seen_workers: set[str] = set()
    while not services.queue.status(job).finished:
        status = services.queue.status(job)
        if status.worker:
            seen_workers |= set(status.worker.split(", "))
        services.queue.wait(job, timeout=0.05)
    status = services.queue.status(job)
    assert status.state == "done", status.error
    assert len(seen_workers) == 2, seen_workers
    assert status.info["all_seeds"] == list(range(11, 19))
    assert [Path(p).read_bytes() for p in status.images] == [img.path.read_bytes() for img in local.images]


def test_progress_interrupt_and_a_model_copied_to_the_pc_that_lacks_it(
    cluster: dict[str, Any], tiny_models_root: Path
) -> None:
    """Two jobs at once (one per PC): live progress with previews from both, Interrupt reaching a
    remote job; the second PC got the default checkpoint from the head, sha256 checked."""
    import hashlib

    services: StudioServices = cluster["services"]
    queue = services.queue
    jobs = [
        queue.submit(Txt2ImgRequest(prompt=f"remote progress {n}", steps=150, **JOB), owner=f"p{n}")
        for n in range(2)
    ]
    seen: dict[str, set[int]] = {job: set() for job in jobs}
    previews: set[str] = set()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        statuses = {job: queue.status(job) for job in jobs}
        for job, status in statuses.items():
            if status.state == "running":
                seen[job].add(status.step)
                if status.preview:
                    previews.add(job)
        if all(len(steps) > 3 for steps in seen.values()) and len(previews) == 2:
            break
        time.sleep(0.05)
    workers = {queue.status(job).worker for job in jobs}
    assert len(workers) == 2, workers  # one job on each PC
    for job in jobs:
        queue.interrupt(job)
    finals = [queue.wait(job, timeout=600) for job in jobs]
    # Interrupt stops each job within a step (it keeps the picture as it stands, or none).
    assert all(final.state in ("cancelled", "done") and len(final.images) <= 1 for final in finals), finals
    for final in finals:
        if final.state == "done":  # the picture as it stood, marked so
            assert "Interrupted" in final.info["infotexts"][0], final.info["infotexts"]
    copied = cluster["roots"][1] / "models" / "Stable-diffusion" / "tiny-sd1.safetensors"
    original = tiny_models_root / "Stable-diffusion" / "tiny-sd1.safetensors"
    assert copied.is_file()
    digest = hashlib.sha256(copied.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(original.read_bytes()).hexdigest()
    assert not list(copied.parent.glob("*.part"))


def test_a_talking_head_is_rendered_on_both_pcs_and_equals_the_one_worker_render(
    cluster: dict[str, Any],
    sadtalker_models_root: Path,
    astronaut_png: Path,
    speech_wav: Path,
    tmp_path: Path,
) -> None:
    """Motion on one PC, frame ranges on both, joined and encoded by the head: the same frames as one
    worker's render, with the speech. The portrait and speech travelled with the jobs (each PC saved
    them in its own scratch folder and removed them after)."""
    services: StudioServices = cluster["services"]
    job = TalkingHeadRequest(image=astronaut_png, audio=speech_wav, seed=5, batch_size=2)
    expected = one_worker_render(sadtalker_models_root, tmp_path, job)
    status = services.queue.wait(services.queue.submit(job, owner="talker"), timeout=900)
    assert status.state == "done", status.error
    info = status.info or {}
    assert len(info["workers"]) == 2 and len(info["frame_ranges"]) >= 2, info
    video = Path(status.images[0])
    assert video.is_relative_to(cluster["work"] / "outputs")
    assert np.array_equal(decode_frames(video), decode_frames(expected))
    assert probe(video)["audio_codecs"] == ["aac"]
    staged = [path for root in cluster["roots"] for path in (root / "data" / "workers").glob("*/inputs")]
    assert staged and not [item for folder in staged for item in folder.iterdir()]


def test_a_node_that_dies_mid_job_has_its_job_finished_on_the_other(cluster: dict[str, Any]) -> None:
    services: StudioServices = cluster["services"]
    queue = services.queue
    second_ids = {
        handle.worker_id
        for handle in services.workers.handles
        if getattr(handle, "node_id", None) == cluster["second"].node_id
    }
    # Two long jobs, one per worker: the one on the second node loses its node mid-job.
    jobs = [
        queue.submit(Txt2ImgRequest(prompt=f"the node goes away {n}", steps=150, **JOB), owner=f"u{n}")
        for n in range(2)
    ]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        statuses = [queue.status(job) for job in jobs]
        if all(status.state == "running" and status.step >= 1 for status in statuses):
            break
        time.sleep(0.05)
    on_second = [status.id for status in statuses if status.worker in second_ids]
    assert len(on_second) == 1, statuses
    victim_job = on_second[0]
    other_job = next(job for job in jobs if job != victim_job)
    cluster["cluster"].remove_node(cluster["second"], allow_graceful=False)
    final = queue.wait(victim_job, timeout=900)
    assert final.state == "done", final.error
    assert final.attempts == 2
    outputs = sorted((cluster["work"] / "outputs").rglob("*.png"))
    assert sum(1 for path in outputs if str(path) in final.images) == 1
    assert queue.wait(other_job, timeout=900).state == "done"
    gone = [state for state in services.workers.states() if state.worker in second_ids]
    assert gone and not any(state.alive for state in gone)
    from app.ui.queue_tab import worker_rows

    shown = {row[0]: row[2] for row in worker_rows(services)}
    assert all(shown[worker] == "gone (its PC left the cluster)" for worker in second_ids), shown


def test_a_pc_with_the_wrong_token_is_refused_with_a_clear_message(cluster: dict[str, Any]) -> None:
    """As a joining PC would check it: a fresh process (Ray reads the token once per process)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from app.cluster.security import ClusterAuthError, check_token\n"
        "try:\n"
        "    check_token(sys.argv[1], sys.argv[2] or None)\n"
        "except ClusterAuthError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env["PYTHONPATH"] = str(ROOT)
    for token, expected in (("not-the-token", "refused this PC's token"), ("", "No cluster token")):
        done = subprocess.run(
            [sys.executable, "-c", script, cluster["cluster"].address, token],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=ROOT,
        )
        assert done.returncode == 3 and expected in done.stdout, (done.stdout, done.stderr[-2000:])
    accepted = subprocess.run(
        [sys.executable, "-c", script, cluster["cluster"].address, TOKEN],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert accepted.returncode == 0, accepted.stderr[-2000:]
