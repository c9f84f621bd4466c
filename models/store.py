"""Saving and loading networks as a JSON config plus tensors.

Tensors are read with ``torch.load(weights_only=True)``: loading a model never
runs pickled code. An INT8 network is rebuilt from its float structure by the
same quantization, then its INT8 tensors are loaded into it.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from data.features import FeatureSpace
from models.network import NetworkConfig, RecNetwork
from models.quantize import quantize_dense, quantize_tables, with_int8_head


def save_network(
    model: nn.Module, config: NetworkConfig, folder: Path, name: str, quantized: dict | None = None
) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"network": asdict(config), "quantized": quantized}
    (folder / f"{name}.json").write_text(json.dumps(meta, indent=2))
    torch.save(model.state_dict(), folder / f"{name}.pt")


def load_network(folder: Path, name: str, space: FeatureSpace) -> nn.Module:
    """Loads ``name`` from ``folder`` in eval mode.

    Raises:
        FileNotFoundError: the config or the tensors are missing.
        ValueError: either cannot be read (cut short, edited, or of another
            network), naming the file.
    """
    folder = Path(folder)
    try:
        return _load_network(folder, name, space)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - torch raises many kinds here
        raise ValueError(
            f"{folder / name}.pt with {name}.json cannot be loaded "
            f"({_reason(error)}): the files were cut "
            "short, edited or mixed up; write them again with the step that "
            "made them (train, or quantize for student_int8), or export the "
            "bundle again"
        ) from None


def _reason(error: Exception) -> str:
    """What went wrong, in a line. torch's own advice for a file that is not
    plain weights, to load it with ``weights_only=False``, would run whatever
    code it pickled: it is left out."""
    if isinstance(error, pickle.UnpicklingError):
        return "not plain weights: pickled objects, or not a torch file at all"
    first = (str(error).strip().splitlines() or [""])[0]
    # Its first sentence: torch goes on with advice of its own.
    sentence = first.split(". ")[0].rstrip(".")[:300]
    return f"{type(error).__name__}: {sentence}"


def _load_network(folder: Path, name: str, space: FeatureSpace) -> nn.Module:
    meta = json.loads((folder / f"{name}.json").read_text())
    raw = meta["network"]
    for key in ("user_vocab_sizes", "item_vocab_sizes", "user_feature_names", "item_feature_names"):
        raw[key] = tuple(raw[key])
    model: nn.Module = RecNetwork(NetworkConfig(**raw), space.item_tokens).eval()
    quantized = meta.get("quantized")
    if quantized:
        model = quantize_tables(model)
        if quantized.get("dense") == "int8 dynamic":
            model = quantize_dense(model)
        elif quantized.get("dense") == "int8 static head":
            model = with_int8_head(model)
    state = torch.load(folder / f"{name}.pt", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
