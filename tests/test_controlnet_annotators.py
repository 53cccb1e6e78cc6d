"""ControlNet annotator preprocessors running from weight files in ``models/ControlNet/annotators``.

Each network is controlnet_aux's real architecture with seeded random weights, saved the way the
real file is laid out (wrappers, ``module.`` prefixes, Caffe layer names), then run through
:func:`run_preprocessor` / :func:`prepare_control_inputs` as the UI and the engine do. To stay fast
on a small CPU the weights are drawn directly (not by each network's slow init) and the big files
are saved in fp16. ZoeDepth runs as the same code with a smaller backbone (BEiT-B at 64 px instead
of BEiT-L at 384 px, ~15 s per CPU forward); the LeReS++ merge network (which works at 1024 px)
and the OpenPose hand network (four scales per hand found) are loaded, not run.
"""

from __future__ import annotations

import base64
import io
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from contract.controlnet import ControlNetUnit
from pipelines.controlnet.annotators import (
    AnnotatorCache,
    load_leres_merge,
    load_openpose_hand,
    load_zoedepth,
)
from pipelines.controlnet.apply import prepare_control_inputs
from pipelines.controlnet.model_files import ControlNetCache
from pipelines.controlnet.preprocessors import default_annotator_dirs, resolve_preprocessor, run_preprocessor
from pipelines.errors import AnnotatorLoadError, AnnotatorMissingError, ControlNetError
from pipelines.models.families import ModelFamily

pytestmark = pytest.mark.filterwarnings(
    # controlnet_aux's package import (done quietly by the product; the tests import it first)
    "ignore:Overwriting tiny_vit:UserWarning",
    "ignore:Mapping deprecated model name:UserWarning",
    "ignore::FutureWarning:timm.*",
    "ignore::FutureWarning:torch.jit.*",
    "ignore::UserWarning:controlnet_aux.*",
    "ignore::DeprecationWarning",
)


class Payload:
    """Stands for code hidden in a pickle: ``weights_only`` loading must refuse it."""


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("models")
    yield folder
    shutil.rmtree(folder)  # ~1 GB of weight files: not worth keeping for pytest's last-runs folders


@pytest.fixture
def cache() -> AnnotatorCache:
    return AnnotatorCache(capacity=3)


def save_annotator(models_root: Path, subfolder: str, filename: str, payload: Any) -> Path:
    """``torch.save`` into ``models/ControlNet/annotators/<subfolder>/<filename>``, where the
    extension keeps them (and where :func:`default_annotator_dirs` looks)."""
    path = models_root / "ControlNet" / "annotators" / subfolder / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def architecture(build: Callable[[], torch.nn.Module], *, real_buffers: bool = False) -> torch.nn.Module:
    """The network's shapes, built on the meta device; with ``real_buffers`` only the parameters
    are left empty (for networks with computed buffers, e.g. ZoeDepth's bin constants)."""
    from accelerate import init_empty_weights

    if real_buffers:
        with init_empty_weights(include_buffers=False):
            return build()
    with torch.device("meta"):
        return build()


def random_weights(
    network: torch.nn.Module, seed: int, *, prefix: str = "", half: bool = False
) -> dict[str, torch.Tensor]:
    """Seeded weights in the ranges of a trained network (He-scaled kernels, unit norm scales,
    small biases, neutral BatchNorm statistics; other buffers as the network made them), keyed
    as the file holds them. Uniform noise of unit variance: much faster to draw than normal."""
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(network.named_parameters())
    state = {}
    for key, value in network.state_dict().items():
        if key in parameters:
            noise = torch.empty(value.shape).uniform_(-math.sqrt(3.0), math.sqrt(3.0), generator=generator)
            if value.ndim >= 2:
                tensor = noise * math.sqrt(2.0 / max(1, math.prod(value.shape[1:])))
            elif key.endswith("weight"):
                tensor = 1.0 + 0.1 * noise
            else:
                tensor = 0.1 * noise
        elif key.endswith("running_var"):
            tensor = torch.ones(value.shape)
        elif key.endswith("running_mean"):
            tensor = torch.zeros(value.shape)
        elif key.endswith("num_batches_tracked"):
            tensor = torch.zeros((), dtype=torch.long)
        else:
            tensor = value.clone()
        state[prefix + key] = tensor.half() if half and tensor.is_floating_point() else tensor
    return state


def photo(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """A small image with gradients, blocks and lines, so edge and depth maps have something to find."""
    width, height = size
    generator = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=2)
    blocks = generator.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3))
    pixels = 0.5 * pixels + 0.5 * blocks.repeat(16, axis=0).repeat(16, axis=1)[:height, :width]
    pixels[height // 3 : height // 3 + 2, :] = 0
    pixels[:, width // 2 : width // 2 + 2] = 255
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def detect(name: str, models_root: Path, cache: AnnotatorCache, **kwargs: Any) -> np.ndarray:
    image = kwargs.pop("image", None)
    result = run_preprocessor(
        name,
        photo() if image is None else image,
        annotator_dir=default_annotator_dirs(models_root),
        annotators=cache,
        **kwargs,
    )
    return np.asarray(result)


def assert_map(result: np.ndarray, shape: tuple[int, int]) -> None:
    assert result.dtype == np.uint8 and result.shape == (*shape, 3)
    assert result.min() != result.max(), "the detected map is constant"


# --- soft edges, scribbles, line art ------------------------------------------------------------


def test_hed_family_runs_from_its_file_and_loads_it_once(
    models_root: Path, cache: AnnotatorCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlnet_aux.hed import ControlNetHED_Apache2

    state = random_weights(architecture(ControlNetHED_Apache2), 1)
    state["norm"] = torch.full((1, 3, 1, 1), 120.0)  # an input offset in the pixel range, as trained
    save_annotator(models_root, "hed", "ControlNetHED.pth", state)
    import pipelines.controlnet.annotators as annotators

    reads: list[Path] = []
    real_read = annotators.read_annotator_weights
    monkeypatch.setattr(
        annotators, "read_annotator_weights", lambda path: reads.append(path) or real_read(path)
    )

    soft = detect("softedge_hed", models_root, cache, resolution=64, image=photo((96, 64)))
    assert_map(soft, (64, 96))  # short side at the resolution, aspect kept, padding removed
    safe = detect("hed_safe", models_root, cache, resolution=64)  # the extension's API name
    assert_map(safe, (64, 64))
    assert set(np.unique(safe)) <= {0, 127, 255}  # the "safe" step quantises to three levels
    scribble = detect("scribble_hed", models_root, cache, resolution=64)
    assert_map(scribble, (64, 64))
    assert set(np.unique(scribble)) == {0, 255}
    assert [p.name for p in reads] == ["ControlNetHED.pth"] and len(cache) == 1


def test_pidinet_family_reads_the_wrapped_dataparallel_file(models_root: Path, cache: AnnotatorCache) -> None:
    from controlnet_aux.pidi.model import pidinet

    state = random_weights(architecture(pidinet), 2, prefix="module.")
    state["module.classifier.weight"] = torch.full((1, 4, 1, 1), 20.0)  # sharper than random: not all grey
    save_annotator(models_root, "pidinet", "table5_pidinet.pth", {"epoch": 14, "state_dict": state})
    assert_map(detect("softedge_pidinet", models_root, cache, resolution=64), (64, 64))
    safe = detect("softedge_pidisafe", models_root, cache, resolution=64)
    assert_map(safe, (64, 64))
    assert set(np.unique(safe)) <= {0, 127, 255}
    scribble = detect("scribble_pidinet", models_root, cache, resolution=64)
    assert scribble.shape == (64, 64, 3) and set(np.unique(scribble)) <= {0, 255}


def test_lineart_realistic_and_coarse_use_their_own_files(models_root: Path, cache: AnnotatorCache) -> None:
    from controlnet_aux.lineart import Generator

    for seed, filename in ((3, "sk_model.pth"), (4, "sk_model2.pth")):
        save_annotator(
            models_root, "lineart", filename, random_weights(architecture(lambda: Generator(3, 1, 3)), seed)
        )
    realistic = detect("lineart_realistic", models_root, cache, resolution=64)
    coarse = detect("lineart_coarse", models_root, cache, resolution=64)
    assert_map(realistic, (64, 64))
    assert_map(coarse, (64, 64))
    assert not np.array_equal(realistic, coarse) and len(cache) == 2


def test_lineart_anime(models_root: Path, cache: AnnotatorCache) -> None:
    import functools

    from controlnet_aux.lineart_anime import UnetGenerator

    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    network = architecture(lambda: UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False))
    save_annotator(
        models_root, "lineart_anime", "netG.pth", random_weights(network, 5, prefix="module.", half=True)
    )
    assert_map(detect("lineart_anime", models_root, cache, resolution=64, image=photo((64, 80))), (80, 64))


def test_mlsd_draws_lines_with_the_slider_thresholds(models_root: Path, cache: AnnotatorCache) -> None:
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    save_annotator(
        models_root, "mlsd", "mlsd_large_512_fp32.pth", random_weights(architecture(MobileV2_MLSD_Large), 6)
    )
    lines = detect("mlsd", models_root, cache, resolution=128, threshold_a=0.01, threshold_b=0.01)
    assert_map(lines, (128, 128))
    assert set(np.unique(lines)) == {0, 255}
    strict = detect("mlsd", models_root, cache, resolution=128, threshold_a=2.0, threshold_b=20.0)
    assert (strict > 0).sum() < (lines > 0).sum()


# --- pose ----------------------------------------------------------------------------------------


def test_openpose_family_loads_body_hand_and_face(models_root: Path, cache: AnnotatorCache) -> None:
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    files = {}
    for seed, filename, build in (
        (7, "body_pose_model.pth", bodypose_model),
        (8, "hand_pose_model.pth", handpose_model),
    ):
        state = random_weights(architecture(build), seed, half=True)
        # the file layout: Caffe layer names, without the stage module the network nests them in
        files[filename] = {k.partition(".")[2]: v for k, v in state.items()}
        save_annotator(models_root, "openpose", filename, files[filename])
    save_annotator(
        models_root, "openpose", "facenet.pth", random_weights(architecture(FaceNet), 9, half=True)
    )
    pose = detect("openpose_face", models_root, cache, resolution=64)
    assert_map(pose, (64, 64))  # these random weights "find" people: their skeletons are drawn
    assert len(cache) == 2  # the body and face networks
    # the hand network (run at four scales per hand: ~8 s on a small CPU) is only loaded here
    hand = load_openpose_hand(default_annotator_dirs(models_root)[0] / "openpose" / "hand_pose_model.pth")
    assert torch.equal(
        hand.state_dict()["model1_0.conv1_1.weight"], files["hand_pose_model.pth"]["conv1_1.weight"].float()
    )


# --- depth and normals -----------------------------------------------------------------------------


def test_midas_depth_and_normals_share_one_network(models_root: Path, cache: AnnotatorCache) -> None:
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    network = architecture(lambda: DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True))
    state = random_weights(network, 10, half=True)
    state["scratch.output_conv.4.bias"] = torch.ones(1).half()  # keep the final ReLU from zeroing all
    save_annotator(models_root, "midas", "dpt_hybrid-midas-501f0c75.pt", state)
    depth = detect("depth_midas", models_root, cache, resolution=64)
    normal = detect("normal_map", models_root, cache, resolution=64, threshold_a=0.1)
    assert_map(depth, (64, 64))
    assert np.array_equal(depth[..., 0], depth[..., 1])  # grey depth
    assert_map(normal, (64, 64))
    assert len(cache) == 1


def test_normal_bae(models_root: Path, cache: AnnotatorCache) -> None:
    import types

    from controlnet_aux.normalbae.nets.NNET import NNET

    options = types.SimpleNamespace(
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )
    state = random_weights(architecture(lambda: NNET(options)), 11, prefix="module.", half=True)
    save_annotator(models_root, "normal_bae", "scannet.pt", {"model": state})
    assert_map(detect("normal_bae", models_root, cache, resolution=64), (64, 64))


def test_leres_depth_and_the_boost_merge_network(models_root: Path, cache: AnnotatorCache) -> None:
    from controlnet_aux.leres.leres.multi_depth_model_woauxi import RelDepthModel
    from controlnet_aux.leres.pix2pix.models.networks import define_G

    state = random_weights(
        architecture(lambda: RelDepthModel(backbone="resnext101")), 12, prefix="module.", half=True
    )
    save_annotator(models_root, "leres", "res101.pth", {"depth_model": state})
    depth = detect("depth_leres", models_root, cache, resolution=64)
    assert_map(depth, (64, 64))
    near_removed = detect("depth_leres", models_root, cache, resolution=64, threshold_a=50)
    assert (near_removed == 255).sum() > (depth == 255).sum()  # "Remove Near %": near pixels go white

    merge = random_weights(
        architecture(lambda: define_G(2, 1, 64, "unet_1024", "none", False, "normal", 0.02, [])),
        13,
        half=True,
    )
    loaded = load_leres_merge(save_annotator(models_root, "leres", "latest_net_G.pth", merge))
    assert all(torch.equal(value, merge[key].float()) for key, value in loaded.state_dict().items())


def test_zoedepth_runs_strictly_loaded_dropping_recomputed_buffers(
    models_root: Path, cache: AnnotatorCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlnet_aux.zoe.zoedepth.models.zoedepth.zoedepth_v1 import ZoeDepth
    from controlnet_aux.zoe.zoedepth.utils import config as zoe_config

    real_config = zoe_config.get_config

    def smaller(*args: Any, **kwargs: Any) -> Any:  # same code, BEiT-B at 64 px: seconds, not minutes
        return {**real_config(*args, **kwargs), "midas_model_type": "DPT_BEiT_B_384", "img_size": [64, 64]}

    monkeypatch.setattr(zoe_config, "get_config", smaller)
    network = architecture(
        lambda: ZoeDepth.build_from_config(smaller("zoedepth", "infer")), real_buffers=True
    )
    state = random_weights(network, 14, half=True)
    for key, buffer in network.named_buffers():  # files saved with older timm hold BEiT's index tables
        if key.endswith("relative_position_index"):
            state[key] = torch.zeros_like(buffer)
    path = save_annotator(models_root, "zoedepth", "ZoeD_M12_N.pt", {"model": state})
    depth = detect("depth_zoe", models_root, cache, resolution=64)
    assert_map(depth, (64, 64))
    buffers = dict(load_zoedepth(path).named_buffers())
    index = buffers["core.core.pretrained.model.blocks.0.attn.relative_position_index"]
    assert int(index.max()) > 0  # computed by the network, not the file's zeros


# --- errors --------------------------------------------------------------------------------------


def test_missing_files_are_named_with_where_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(AnnotatorMissingError) as caught:
        run_preprocessor("depth_zoe", photo(), annotator_dir=default_annotator_dirs(tmp_path))
    message = str(caught.value)
    assert "ZoeD_M12_N.pt" in message and str(tmp_path / "ControlNet" / "annotators") in message
    assert "https://huggingface.co/lllyasviel/Annotators/resolve/main/ZoeD_M12_N.pt" in message
    with pytest.raises(
        AnnotatorMissingError, match=r"netG\.pth, which is not in models/ControlNet/annotators"
    ):
        run_preprocessor("lineart_anime", photo(), annotator_dir=[])


@pytest.mark.parametrize("name", ["seg_ofade20k", "segmentation", "oneformer_coco", "dw_openpose_full"])
def test_unsupported_preprocessors_say_so_before_asking_for_files(name: str, tmp_path: Path) -> None:
    with pytest.raises(ControlNetError) as caught:
        run_preprocessor(name, photo(), annotator_dir=tmp_path)
    assert not isinstance(caught.value, AnnotatorMissingError)
    message = str(caught.value)
    assert "not supported in this version" in message and "'none'" in message
    assert message.startswith(f"'{resolve_preprocessor(name)[1].label}': ")


def test_pickles_with_code_and_wrong_files_are_refused(tmp_path: Path) -> None:
    from controlnet_aux.hed import ControlNetHED_Apache2

    hed = random_weights(architecture(ControlNetHED_Apache2), 15)
    save_annotator(tmp_path, "hed", "ControlNetHED.pth", {**hed, "payload": Payload()})
    with pytest.raises(AnnotatorLoadError) as caught:
        run_preprocessor("softedge_hed", photo(), annotator_dir=default_annotator_dirs(tmp_path))
    message = str(caught.value)
    assert "'softedge_hed'" in message and "ControlNetHED.pth: refused to load" in message
    assert "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth" in message

    save_annotator(tmp_path, "lineart", "sk_model.pth", hed)  # right name, wrong network
    with pytest.raises(AnnotatorLoadError, match=r"sk_model\.pth: does not hold the weights of the line-art"):
        run_preprocessor("lineart", photo(), annotator_dir=default_annotator_dirs(tmp_path))


# --- the engine's path -----------------------------------------------------------------------------


def test_control_inputs_preprocess_with_the_engines_cache(tmp_path: Path) -> None:
    from controlnet_aux.pidi.model import pidinet
    from diffusers import ControlNetModel

    models_root = tmp_path / "models"
    save_annotator(
        models_root,
        "pidinet",
        "table5_pidinet.pth",
        {"state_dict": random_weights(architecture(pidinet), 17)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(16)
        controlnet = ControlNetModel(  # a tiny SD1-style ControlNet (32-wide context)
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            cross_attention_dim=32,
            conditioning_embedding_out_channels=(16, 32),
        )
    controlnet.save_pretrained(tmp_path / "tiny-softedge", safe_serialization=True)
    buffer = io.BytesIO()
    photo((64, 64), seed=3).save(buffer, format="PNG")
    unit = ControlNetUnit(
        enabled=True,
        module="softedge_pidinet",
        model="tiny-softedge",
        image=base64.b64encode(buffer.getvalue()).decode(),
        processor_res=64,
    )
    annotators = AnnotatorCache()
    for _ in range(2):
        control = prepare_control_inputs(
            [unit],
            ControlNetCache(tmp_path),
            width=64,
            height=64,
            family=ModelFamily("sd1"),
            annotator_dir=default_annotator_dirs(models_root),
            annotators=annotators,
        )
        assert control is not None
        detected = np.asarray(control.detected_maps[0])
        assert_map(detected, (64, 64))
    assert len(annotators) == 1
