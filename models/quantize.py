"""INT8 student: row-wise INT8 embedding tables, and INT8 dense layers where it pays.

Embedding tables go through TorchRec's ``quantize_embeddings`` (FBGEMM row-wise
INT8: one scale and offset per row). Dense layers are quantized with PyTorch's
dynamic INT8 ``Linear`` only when that is measured faster on a sample batch on
this machine; at this model's width it usually is not, and the float layers
are kept.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.inference.modules import quantize_embeddings
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from models.network import Batch, RecNetwork

logger = logging.getLogger(__name__)


# FBGEMM pads each INT8 row (values plus a 4-byte scale and offset) to this many
# bytes. Its default of 16 turns a 36-byte row of 32 dimensions into 48 bytes;
# 4 keeps it at 36 with the same lookups on CPU.
ROW_ALIGNMENT = 4


def quantize_tables(model: RecNetwork) -> RecNetwork:
    """A copy of ``model`` whose embedding tables are row-wise INT8."""
    quantized = copy.deepcopy(model).eval()
    quant_prep_customize_row_alignment(quantized, [EmbeddingBagCollection], ROW_ALIGNMENT)
    return quantize_embeddings(quantized, dtype=torch.qint8, inplace=True)


def quantize_dense(model: nn.Module) -> nn.Module:
    """A copy with dynamic INT8 ``Linear`` layers (weights INT8, activations
    quantized per batch)."""
    with warnings.catch_warnings():
        # quantize_dynamic is deprecated in favour of torchao, which is slower
        # than float32 on CPU without torch.compile (measured on this project).
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )


def quantize_student(
    model: RecNetwork, sample: Batch, candidates: torch.Tensor, dense: str = "auto"
) -> tuple[nn.Module, dict]:
    """INT8 student, and a record of what was quantized and why.

    Args:
        sample: a batch for timing the dense choice.
        candidates: item indices scored per user in the timing (serving's shape).
        dense: ``"auto"`` (measure), ``"always"`` or ``"never"``.
    """
    if dense not in ("auto", "always", "never"):
        raise ValueError(f"dense must be auto, always or never, got {dense!r}")
    tables = quantize_tables(model)
    info = {"embedding_tables": "int8 row-wise", "dense": "float32"}
    if dense == "never":
        return tables, info
    both = quantize_dense(tables)
    if dense == "always":
        info["dense"] = "int8 dynamic"
        return both, info
    float_ms = _time_scoring(tables, sample, candidates)
    int8_ms = _time_scoring(both, sample, candidates)
    info.update(dense_float_ms=float_ms, dense_int8_ms=int8_ms)
    if int8_ms < 0.9 * float_ms:
        info["dense"] = "int8 dynamic"
        return both, info
    logger.info(
        "keeping float32 dense layers: INT8 scoring took %.1f ms against %.1f ms",
        int8_ms,
        float_ms,
    )
    return tables, info


@torch.no_grad()
def _time_scoring(model: nn.Module, sample: Batch, candidates: torch.Tensor) -> float:
    model.score_candidates(sample, candidates)  # warm-up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        model.score_candidates(sample, candidates)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def embedding_bytes(model: nn.Module) -> int:
    """Bytes held by the embedding tables (float or INT8 with row scales)."""
    total = 0
    for name, tensor in model.state_dict().items():
        if "embedding_bags" in name:
            total += tensor.numel() * tensor.element_size()
    return total
