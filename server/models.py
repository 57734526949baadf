"""Reading and writing model files (safetensors: no pickle, loads without torch)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from server.errors import ConfigError


def load_model(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"initial model {path} does not exist (expected a .safetensors file)")
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError(f"initial model {path} is not a readable .safetensors file: {error}") from error


def save_model(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({name: np.ascontiguousarray(t) for name, t in tensors.items()}, str(tmp))
    tmp.replace(path)
