"""Our SadTalker networks have exactly the official checkpoint layout and load official-format files strictly.

``official_checkpoint_keys.json`` (next to this file) lists every key and shape of the official
``SadTalker_V0.0.2_256.safetensors`` and of the two mapping files, read off the reference
implementation's modules. Random-weight networks stand in for the real weights (never downloaded).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sadtalker.checkpoints import (
    MAPPING_CROP_FILE,
    MAPPING_FULL_FILE,
    SadTalkerModels,
    checkpoint_file_name,
    find_sadtalker_files,
    load_mapping,
    load_sadtalker_checkpoint,
)
from sadtalker.errors import SadTalkerCheckpointError, SadTalkerError
from sadtalker.networks.factory import SUB_MODEL_PREFIXES, build_mapping, build_sub_model
from sadtalker.networks.keypoints import bins_to_degrees, pose_keypoints, rotation_matrices
from sadtalker.networks.mapping import HeadMotion

OFFICIAL = json.loads((Path(__file__).parent / "official_checkpoint_keys.json").read_text())
SHAPES = OFFICIAL["shapes"]
COUNTER = "num_batches_tracked"
DOWNLOAD_COMMAND = "python3 launch.py download vinthony/SadTalker --kind SadTalker --file"


def official_keys(section: str, prefix: str | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape for one JSON section, with the prefix stripped when one is given."""
    entries = OFFICIAL[section]
    if prefix is None:
        return {key: tuple(shape) for key, shape in entries.items()}
    start = prefix + "."
    return {key[len(start) :]: tuple(shape) for key, shape in entries.items() if key.startswith(start)}


def layout_differences(network: nn.Module, expected: dict[str, tuple[int, ...]]) -> list[str]:
    ours = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    differences = [f"missing {key} {list(expected[key])}" for key in sorted(set(expected) - set(ours))]
    differences += [f"unexpected {key} {list(ours[key])}" for key in sorted(set(ours) - set(expected))]
    differences += [
        f"shape of {key}: ours {list(ours[key])}, official {list(expected[key])}"
        for key in sorted(set(ours) & set(expected))
        if ours[key] != expected[key]
    ]
    return differences


@pytest.fixture(scope="module")
def networks() -> dict[str, nn.Module]:
    """Every sub-model with seeded random weights, in eval mode, plus both mapping networks."""
    torch.manual_seed(0)
    built: dict[str, nn.Module] = {prefix: build_sub_model(prefix) for prefix in SUB_MODEL_PREFIXES}
    built["mapping_70"] = build_mapping(70)
    built["mapping_73"] = build_mapping(73)
    for network in built.values():
        network.eval()
    return built


def official_state(networks: dict[str, nn.Module], *, with_counters: bool = True) -> dict[str, torch.Tensor]:
    """The networks' weights under the official prefixes, as one flat safetensors-ready dict."""
    return {
        f"{prefix}.{key}": value.contiguous()
        for prefix in SUB_MODEL_PREFIXES
        for key, value in networks[prefix].state_dict().items()
        if with_counters or not key.endswith(COUNTER)
    }


@pytest.fixture(scope="module")
def checkpoint_files(
    networks: dict[str, nn.Module], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The official files written from the random networks (the main one with and without counters)."""
    folder = tmp_path_factory.mktemp("models") / "SadTalker"
    folder.mkdir()
    with_counters = folder / checkpoint_file_name(256)
    save_file(official_state(networks), str(with_counters))
    without_counters = tmp_path_factory.mktemp("no_counters") / checkpoint_file_name(256)
    save_file(official_state(networks, with_counters=False), str(without_counters))
    mapping_files = {}
    for name, coeffs in ((MAPPING_CROP_FILE, 70), (MAPPING_FULL_FILE, 73)):
        mapping = networks[f"mapping_{coeffs}"]
        optimizer = torch.optim.Adam(mapping.parameters())
        training_checkpoint = {
            "mapping": mapping.state_dict(),
            "epoch": 229 if coeffs == 70 else 109,
            "optimizer_mapping": optimizer.state_dict(),
            "discriminator": {"extra.weight": torch.zeros(2)},
        }
        torch.save(training_checkpoint, folder / name)
        mapping_files[name] = folder / name
    return {"with_counters": with_counters, "without_counters": without_counters, **mapping_files}


def write_header_only_safetensors(
    path: Path, shapes: dict[str, tuple[int, ...]], truncate_by: int = 0
) -> None:
    """A valid safetensors header over zero-filled (sparse) data: full-size layouts cost no real I/O."""
    header: dict[str, object] = {}
    offset = 0
    for key, shape in shapes.items():
        dtype, itemsize = ("I64", 8) if key.endswith(COUNTER) else ("F32", 4)
        size = itemsize * int(torch.Size(shape).numel())
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset - truncate_by)


# --- layout -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", SUB_MODEL_PREFIXES)
def test_sub_model_keys_and_shapes_match_the_official_file(
    networks: dict[str, nn.Module], prefix: str
) -> None:
    differences = layout_differences(networks[prefix], official_keys("safetensors_256", prefix))
    assert not differences, f"{prefix} differs from the official layout:\n" + "\n".join(differences)


@pytest.mark.parametrize("section", ["mapping_70", "mapping_73"])
def test_mapping_keys_and_shapes_match_the_official_files(
    networks: dict[str, nn.Module], section: str
) -> None:
    differences = layout_differences(networks[section], official_keys(section))
    assert not differences, f"{section} differs from the official layout:\n" + "\n".join(differences)


def test_all_official_keys_are_covered_by_the_five_prefixes() -> None:
    prefixes = {key.split(".", 1)[0] for key in OFFICIAL["safetensors_256"]}
    assert prefixes == set(SUB_MODEL_PREFIXES)
    assert len(OFFICIAL["safetensors_256"]) == 1305


def test_parameter_counts_match_the_official_models(networks: dict[str, nn.Module]) -> None:
    counts = OFFICIAL["param_counts"]
    for prefix in SUB_MODEL_PREFIXES:
        network, expected = networks[prefix], counts[prefix]
        state = network.state_dict()
        buffers = dict(network.named_buffers())
        measured = {
            "keys": len(state),
            "numel_all_tensors": sum(value.numel() for value in state.values()),
            "num_parameters": sum(parameter.numel() for parameter in network.parameters()),
            "num_buffer_elems": sum(buffer.numel() for buffer in buffers.values()),
            "param_keys": len(list(network.parameters())),
            "buffer_keys": len(buffers),
            "num_batches_tracked_keys": sum(key.endswith(COUNTER) for key in state),
            "spectral_norm_weight_orig_keys": sum(key.endswith("weight_orig") for key in state),
        }
        assert measured == expected, prefix
    for section in ("mapping_70", "mapping_73"):
        assert sum(p.numel() for p in networks[section].parameters()) == counts[section]["num_parameters"]
    total = sum(sum(p.numel() for p in networks[prefix].parameters()) for prefix in SUB_MODEL_PREFIXES)
    assert total == counts["total_safetensors_256"]["num_parameters"]


def test_dtypes_match_the_official_file(networks: dict[str, nn.Module]) -> None:
    int64_keys = set(OFFICIAL["dtypes"]["int64_scalar_keys"])
    state = official_state(networks)
    assert {key for key, value in state.items() if value.dtype == torch.int64} == int64_keys
    assert all(state[key].dim() == 0 for key in int64_keys)
    assert all(value.dtype == torch.float32 for key, value in state.items() if key not in int64_keys)


# --- loading ------------------------------------------------------------------------------------


def assert_same_weights(loaded: SadTalkerModels, networks: dict[str, nn.Module]) -> None:
    for prefix, network in loaded.networks().items():
        original = networks[prefix].state_dict()
        state = network.state_dict()
        assert state.keys() == original.keys(), prefix
        for key, value in original.items():
            if not key.endswith(COUNTER):
                assert torch.equal(state[key], value), f"{prefix}.{key}"
        assert not network.training, prefix
        assert not any(parameter.requires_grad for parameter in network.parameters()), prefix


def test_loads_the_official_layout_strictly(
    checkpoint_files: dict[str, Path], networks: dict[str, nn.Module]
) -> None:
    loaded = load_sadtalker_checkpoint(checkpoint_files["with_counters"], 256)
    assert loaded.size == 256
    assert_same_weights(loaded, networks)
    # The spectral-norm convolutions compute the same effective weight as the originals (up to
    # float rounding: the file's tensors may take another SIMD path than the originals).
    sample = torch.randn(1, 512, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name in ("G_middle_0.conv_0", "up_0.conv_s", "up_1.conv_1"):
            ours = loaded.generator.decoder.get_submodule(name)
            theirs = networks["generator"].decoder.get_submodule(name)
            probe = sample[:, : theirs.in_channels]
            expected = theirs(probe)
            torch.testing.assert_close(
                ours(probe), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()
            )


def test_loads_a_file_without_batchnorm_counters(
    checkpoint_files: dict[str, Path], networks: dict[str, nn.Module]
) -> None:
    loaded = load_sadtalker_checkpoint(checkpoint_files["without_counters"], 256)
    assert_same_weights(loaded, networks)


@pytest.mark.parametrize(("file_name", "coeffs"), [(MAPPING_CROP_FILE, 70), (MAPPING_FULL_FILE, 73)])
def test_loads_mapping_checkpoints_ignoring_training_entries(
    checkpoint_files: dict[str, Path], networks: dict[str, nn.Module], file_name: str, coeffs: int
) -> None:
    mapping = load_mapping(checkpoint_files[file_name])
    assert mapping.coeff_count == coeffs
    original = networks[f"mapping_{coeffs}"].state_dict()
    assert mapping.state_dict().keys() == original.keys()
    assert all(torch.equal(mapping.state_dict()[key], value) for key, value in original.items())
    assert not mapping.training


def test_finds_the_official_files(checkpoint_files: dict[str, Path]) -> None:
    models_dir = checkpoint_files["with_counters"].parent.parent
    files = find_sadtalker_files(models_dir)
    assert files.checkpoint(256) == checkpoint_files["with_counters"]
    assert files.mapping("crop") == files.mapping("extcrop") == files.mapping("resize") == files.mapping_crop
    assert files.mapping("full") == files.mapping("extfull") == checkpoint_files[MAPPING_FULL_FILE]
    assert files.checkpoint_512 is None
    with pytest.raises(SadTalkerCheckpointError) as caught:
        files.checkpoint(512)
    message = str(caught.value)
    assert "SadTalker_V0.0.2_512.safetensors" in message
    assert f"{DOWNLOAD_COMMAND} SadTalker_V0.0.2_512.safetensors" in message
    with pytest.raises(SadTalkerError, match="preprocess mode 'stretch'"):
        files.mapping("stretch")


def test_missing_files_name_the_file_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(SadTalkerCheckpointError) as caught:
        load_sadtalker_checkpoint(tmp_path / checkpoint_file_name(256), 256)
    assert f"{DOWNLOAD_COMMAND} SadTalker_V0.0.2_256.safetensors" in str(caught.value)
    with pytest.raises(SadTalkerCheckpointError) as caught:
        load_mapping(tmp_path / MAPPING_FULL_FILE)
    assert MAPPING_FULL_FILE in str(caught.value)
    assert "huggingface.co/vinthony/SadTalker" in str(caught.value)
    found = find_sadtalker_files(tmp_path)
    assert (found.checkpoint_256, found.checkpoint_512, found.mapping_crop, found.mapping_full) == (None,) * 4


# Each case edits the official layout and names the text the error must contain.
LayoutEdit = Callable[[dict[str, tuple[int, ...]]], None]


def rename_key(layout: dict[str, tuple[int, ...]]) -> None:
    layout["kp_extractor.kp.weights"] = layout.pop("kp_extractor.kp.weight")


def reshape_key(layout: dict[str, tuple[int, ...]]) -> None:
    layout["generator.decoder.conv_img.weight"] = (3, 32, 3, 3)


def drop_sub_model(layout: dict[str, tuple[int, ...]]) -> None:
    for key in [key for key in layout if key.startswith("face_3drecon.")]:
        del layout[key]


def plain_spectral_weight(layout: dict[str, tuple[int, ...]]) -> None:
    stem = "generator.decoder.G_middle_0.conv_0.weight"
    layout[stem] = layout.pop(stem + "_orig")


def add_unknown_prefix(layout: dict[str, tuple[int, ...]]) -> None:
    layout["unet.conv_in.weight"] = (4, 4, 1, 1)


@pytest.mark.parametrize(
    ("edit", "expected_fragments"),
    [
        (
            rename_key,
            ["kp_extractor: 1 missing keys: kp.weight", "kp_extractor: 1 unexpected keys: kp.weights"],
        ),
        (reshape_key, ["decoder.conv_img.weight (file [3, 32, 3, 3], expected [3, 64, 3, 3])"]),
        (drop_sub_model, ["face_3drecon: 279 missing keys: backbone.bn1.bias", "more)"]),
        (plain_spectral_weight, ["missing keys: decoder.G_middle_0.conv_0.weight_orig"]),
        (add_unknown_prefix, ["unexpected keys outside the known sub-models: unet.conv_in.weight"]),
    ],
)
def test_wrong_keys_give_a_clear_error(
    tmp_path: Path, edit: LayoutEdit, expected_fragments: list[str]
) -> None:
    layout = official_keys("safetensors_256")
    edit(layout)
    path = tmp_path / checkpoint_file_name(256)
    write_header_only_safetensors(path, layout)
    with pytest.raises(SadTalkerCheckpointError) as caught:
        load_sadtalker_checkpoint(path, 256)
    message = str(caught.value)
    assert message.startswith("SadTalker_V0.0.2_256.safetensors does not hold the official SadTalker weights")
    for fragment in expected_fragments:
        assert fragment in message
    assert f"{DOWNLOAD_COMMAND} SadTalker_V0.0.2_256.safetensors" in message


def test_truncated_download_is_reported(tmp_path: Path) -> None:
    path = tmp_path / checkpoint_file_name(512)
    write_header_only_safetensors(path, official_keys("safetensors_256"), truncate_by=1000)
    with pytest.raises(SadTalkerCheckpointError, match=r"truncated \(1000 bytes missing") as caught:
        load_sadtalker_checkpoint(path, 512)
    assert f"{DOWNLOAD_COMMAND} SadTalker_V0.0.2_512.safetensors" in str(caught.value)


def test_head_estimator_entries_are_ignored_and_512_layout_loads(tmp_path: Path) -> None:
    layout = official_keys("safetensors_256")
    layout["he_estimator.fc_yaw.weight"] = (66, 2048)
    path = tmp_path / checkpoint_file_name(512)
    write_header_only_safetensors(path, layout)
    loaded = load_sadtalker_checkpoint(path, 512)
    assert loaded.size == 512
    assert not loaded.kp_extractor.kp.weight.any()


def test_size_and_file_name_must_agree(checkpoint_files: dict[str, Path]) -> None:
    with pytest.raises(SadTalkerCheckpointError, match="256-pixel model but a 512-pixel render"):
        load_sadtalker_checkpoint(checkpoint_files["with_counters"], 512)
    with pytest.raises(SadTalkerError, match="256 or 512"):
        load_sadtalker_checkpoint(checkpoint_files["with_counters"], 384)


def test_mapping_file_errors_are_clear(tmp_path: Path, networks: dict[str, nn.Module]) -> None:
    no_entry = tmp_path / MAPPING_CROP_FILE
    torch.save({"epoch": 1, "generator": {}}, no_entry)
    with pytest.raises(
        SadTalkerCheckpointError, match="expected a checkpoint with a 'mapping' entry, found epoch"
    ):
        load_mapping(no_entry)

    renamed = dict(networks["mapping_70"].state_dict())
    renamed["fc_expression.weight"] = renamed.pop("fc_exp.weight")
    wrong_key = tmp_path / "renamed.pth.tar"
    torch.save({"mapping": renamed, "epoch": 1}, wrong_key)
    with pytest.raises(SadTalkerCheckpointError) as caught:
        load_mapping(wrong_key)
    assert "mapping: 1 missing keys: fc_exp.weight" in str(caught.value)
    assert "1 unexpected keys: fc_expression.weight" in str(caught.value)

    not_a_pickle = tmp_path / MAPPING_FULL_FILE
    not_a_pickle.write_bytes(b"<html>404</html>")
    with pytest.raises(SadTalkerCheckpointError, match="not a readable mapping checkpoint"):
        load_mapping(not_a_pickle)


def test_importing_the_library_does_not_import_torch() -> None:
    code = (
        "import sys, sadtalker, sadtalker.checkpoints, sadtalker.networks; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --- forward passes with the shapes the reference produced for 2 s of audio ----------------------


def shape(name: str) -> tuple[int, ...]:
    return tuple(SHAPES[name])


@pytest.fixture(scope="module")
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def record_shapes(module: nn.Module, seen: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """Log (input shape, output shape) of every call, to check inner shapes without extra forwards."""
    module.register_forward_hook(
        lambda _, args, output: seen.append((tuple(args[0].shape), tuple(output.shape)))
    )


def test_audio_to_coefficients_forward(rng: torch.Generator) -> None:
    torch.manual_seed(0)
    audio2exp, audio2pose = build_sub_model("audio2exp").eval(), build_sub_model("audio2pose").eval()
    exp_encoder_calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    pose_encoder_calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    record_shapes(audio2exp.audio_encoder, exp_encoder_calls)
    record_shapes(audio2pose.audio_encoder, pose_encoder_calls)
    mels = torch.randn(shape("indiv_mels (bs,T,1,80,16)"), generator=rng)
    reference = torch.randn(shape("ref (bs,T,70)"), generator=rng)
    ratio = torch.rand(shape("ratio_gt (bs,T,1)"), generator=rng)
    reference_pose, style = reference[:, 0, -6:], torch.tensor([3])
    with torch.no_grad():
        expression = audio2exp.predict(mels, reference[:, :, :64], ratio)
        pose = audio2pose.predict(mels, reference_pose, style, generator=torch.Generator().manual_seed(5))
        # Frames are independent: the chunk size changes nothing.
        rechunked = audio2exp.predict(mels[:, :12], reference[:, :12, :64], ratio[:, :12], chunk_frames=5)
        # Shorter than one 32-frame window: padded at the front; seeded latents are reproducible.
        short = [
            audio2pose.predict(mels[:, :9], reference_pose, style, torch.Generator().manual_seed(7))
            for _ in "ab"
        ]

    assert exp_encoder_calls[0] == (
        shape("audio2exp.netG per-chunk input audiox (bs*10,1,80,16)"),
        shape("audio2exp.audio_encoder(audiox) (N,512,1,1)"),
    )
    assert expression.shape == shape("audio2exp exp_coeff_pred (bs,T,64)")
    torch.testing.assert_close(rechunked, expression[:, :12])
    assert pose_encoder_calls[0][1] == shape("audio2pose.audio_encoder(indiv_mels[:,1:33]) (bs,32,512)")
    assert pose.shape == shape("audio2pose pose_pred (bs,T,6)")
    torch.testing.assert_close(pose[:, 0], reference_pose)  # frame 0 is the source pose
    assert short[0].shape == (1, 9, 6)
    torch.testing.assert_close(short[0], short[1])
    coefficients = torch.cat([expression, pose], dim=-1)
    assert coefficients.shape == shape("coeffs_pred (bs,T,70) saved as coeff_3dmm[T,70]")


@pytest.mark.parametrize("mode", ["crop", "full"])
def test_mapping_forward(networks: dict[str, nn.Module], rng: torch.Generator, mode: str) -> None:
    source = torch.randn(shape(f"[{mode}, batch_size=2] source_semantics"), generator=rng)
    targets = torch.randn(shape(f"[{mode}, batch_size=2] target_semantics_list"), generator=rng)
    mapping = networks["mapping_70" if mode == "crop" else "mapping_73"]
    with torch.no_grad():
        motion = mapping(source)
        first_target = mapping(targets[:, 0])
    for field in ("yaw", "pitch", "roll", "t", "exp"):
        assert getattr(motion, field).shape == shape(f"[{mode}] mapping(source_semantics)[{field}]")
    assert first_target.exp.shape == shape(f"[{mode}] mapping(target_semantics_list[:,0])[exp]")


def test_keypoint_detector_and_pose_transform_forward(
    networks: dict[str, nn.Module], rng: torch.Generator
) -> None:
    image = torch.rand(shape("[crop, batch_size=2] source_image"), generator=rng)
    with torch.no_grad():
        canonical = networks["kp_extractor"](image)
        motion = networks["mapping_70"](torch.randn(2, 70, 27, generator=rng))
    assert canonical.shape == shape("kp_extractor(source_image)[value] (bs=2)")
    assert canonical.abs().max() <= 1  # expected positions on the [-1, 1] grid
    assert pose_keypoints(canonical, motion).shape == shape("keypoint_transformation value (bs=2)")


def test_pose_transform_conventions() -> None:
    centre_bin = torch.full((1, 66), -1e4)
    centre_bin[0, 33] = 0  # bin 33 is 33 * 3 - 99 = 0 degrees
    assert bins_to_degrees(centre_bin).item() == pytest.approx(0.0)
    keypoints = torch.tensor([[[0.1, 0.2, 0.3]]])
    motion = HeadMotion(
        yaw=centre_bin,
        pitch=centre_bin,
        roll=centre_bin,
        t=torch.tensor([[5.0, 0.5, 7.0]]),
        exp=torch.ones(1, 3),
    )
    # Zero angles: identity rotation; only the y translation applies; expression offsets add.
    expected = torch.tensor([[[1.1, 1.7, 1.3]]])
    torch.testing.assert_close(pose_keypoints(keypoints, motion), expected)
    torch.testing.assert_close(pose_keypoints(keypoints, motion, with_expression=False), expected - 1)
    quarter = torch.tensor([90.0])
    yaw_only = rotation_matrices(quarter, torch.zeros(1), torch.zeros(1))[0]
    # A yaw turns about the y axis: x goes to -z (up to the 3.14-for-pi the weights were trained with).
    torch.testing.assert_close(
        yaw_only @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, -1.0]), atol=1e-3, rtol=0
    )


def test_renderer_shapes_at_256_and_512() -> None:
    """Shape propagation on the meta device: the full 256/512 forward without its CPU cost."""
    with torch.device("meta"):
        detector, generator = build_sub_model("kp_extractor"), build_sub_model("generator")
        for size in (256, 512):
            image = torch.empty(1, 3, size, size)
            keypoints = detector(image)
            out = generator(image, driving_kp=keypoints, source_kp=keypoints)
            feature = size // 4
            assert keypoints.shape == (1, 15, 3)
            assert out["prediction"].shape == (1, 3, size, size)
            assert out["mask"].shape == (1, 16, 16, feature, feature)
            assert out["occlusion_map"].shape == (1, 1, feature, feature)
            if size == 256:
                assert out["mask"].shape == shape("generator(...) [mask] (bs=1, 256)")
                assert out["occlusion_map"].shape == shape("generator(...) [occlusion_map] (bs=1, 256)")
                assert out["prediction"].shape == shape("generator(...) [prediction] (bs=1, 256)")


def test_generator_forward(networks: dict[str, nn.Module], rng: torch.Generator) -> None:
    """A real forward at 128 pixels (the architecture is resolution-agnostic; 256 costs 4x the CPU)."""
    generator = networks["generator"]
    source_kp = torch.rand(1, 15, 3, generator=rng) - 0.5
    driving_kp = source_kp + 0.05 * torch.randn(1, 15, 3, generator=rng)
    with torch.no_grad():
        image = torch.rand(1, 3, 128, 128, generator=rng)
        out = generator(image, driving_kp=driving_kp, source_kp=source_kp)
        volume = generator.encode_source(image)
        flows = generator.dense_motion_network.candidate_flows((1, 16, 32, 32), driving_kp, source_kp)
    assert volume.shape == (1, 32, 16, 32, 32)
    assert out["prediction"].shape == (1, 3, 128, 128)
    assert out["mask"].shape == (1, 16, 16, 32, 32)
    assert out["occlusion_map"].shape == (1, 1, 32, 32)
    assert out["prediction"].min() >= 0 and out["prediction"].max() <= 1
    assert out["occlusion_map"].min() >= 0 and out["occlusion_map"].max() <= 1
    torch.testing.assert_close(out["mask"].sum(dim=1), torch.ones(1, 16, 32, 32))
    # Flow k+1 moves keypoint k's driving position onto its source position; flow 0 is the identity.
    grid = flows[0, 0]
    shift = (source_kp - driving_kp)[0].view(15, 1, 1, 1, 3).expand(15, 16, 32, 32, 3)
    torch.testing.assert_close(flows[0, 1:] - grid, shift)
    assert grid[0, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert grid[-1, -1, -1].tolist() == [1.0, 1.0, 1.0]


def test_face_reconstruction_forward(networks: dict[str, nn.Module], rng: torch.Generator) -> None:
    with torch.no_grad():
        coefficients = networks["face_3drecon"](torch.rand(1, 3, 224, 224, generator=rng))
    assert coefficients.shape == shape("face_3drecon(img (1,3,224,224)) coeffs")
