"""Read a ``.safetensors`` header without reading any tensor data.

The header (a little-endian u64 length, then JSON) lists every tensor's name, dtype, shape and
byte range, which is all the registry needs to tell a model's family, and lets us spot a
truncated download before handing the file to torch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import CheckpointLoadError

_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def shape(self, key: str) -> tuple[int, ...] | None:
        info = self.tensors.get(key)
        return info.shape if info else None


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse the header and check the file is long enough for the data it declares."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointLoadError(f"{path.name}: file is empty or truncated ({size} bytes).")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES or length + 8 > size:
                raise CheckpointLoadError(
                    f"{path.name}: not a valid .safetensors file (header length {length} does not fit "
                    f"in {size} bytes). Re-download it."
                )
            raw = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointLoadError(
            f"{path.name}: cannot read the file header ({exc}). Re-download it."
        ) from exc
    if not isinstance(raw, dict):
        raise CheckpointLoadError(f"{path.name}: header is not a JSON object. Re-download it.")
    metadata = raw.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    end_of_data = 0
    for name, info in raw.items():
        try:
            tensors[name] = TensorInfo(dtype=str(info["dtype"]), shape=tuple(int(d) for d in info["shape"]))
            end_of_data = max(end_of_data, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointLoadError(f"{path.name}: malformed entry for tensor '{name}'.") from exc
    if 8 + length + end_of_data > size:
        missing = 8 + length + end_of_data - size
        raise CheckpointLoadError(
            f"{path.name}: file is truncated ({missing} bytes missing of {8 + length + end_of_data}). "
            "The download was probably interrupted: download it again."
        )
    return SafetensorsHeader(tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()})
