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


# TorchRec's INT8 rows are [fp16 scale, fp16 offset, D x uint8]; FBGEMM's
# conversion ops want the scale and offset at the end instead.
SCALE_OFFSET_BYTES = 4


def dequantize_rows(weight: torch.Tensor) -> torch.Tensor:
    """``[R, 4 + D]`` TorchRec INT8 rows to ``[R, D]`` float32."""
    fused = torch.cat([weight[:, SCALE_OFFSET_BYTES:], weight[:, :SCALE_OFFSET_BYTES]], 1)
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, 8)


def quantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """``[R, D]`` float to ``[R, 4 + D]`` INT8 rows, each with its own scale and
    offset from its current minimum and maximum."""
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(
        rows.float().contiguous(), 8
    )
    return torch.cat([fused[:, -SCALE_OFFSET_BYTES:], fused[:, :-SCALE_OFFSET_BYTES]], 1)


class Int8Refresher:
    """Keeps a served INT8 student current as new float weights arrive.

    Each refresh folds the new weights into a float32 master copy of every
    table (``master = decay * master + (1 - decay) * theta``) and requantizes
    the tables from it, re-deriving each row's scale and offset as the row's
    range moves. INT8 values are never updated in place: a chain of
    dequantize-update-requantize on the INT8 values themselves would carry each
    refresh's rounding into the next, while here the served rows are always
    within one quantization step of the exact float EMA.

    The master starts as the dequantized served tables. Dense layers, which
    stay float32 in the served student, are averaged in place.

    Args:
        served: the INT8 student (tables quantized by ``quantize_tables``).
        decay: the EMA decay of a refresh.

    Raises:
        ValueError: the served student's dense layers are INT8 too.
    """

    def __init__(self, served: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        state = served.state_dict()
        if any("_packed_params" in name for name in state):
            raise ValueError(
                "refresh needs float dense layers; quantize with dense='never' "
                "or re-quantize from the float student instead"
            )
        self.served, self.decay = served, decay
        self.table_names = [n for n, t in state.items() if t.dtype == torch.uint8]
        self.master = {n: dequantize_rows(state[n]) for n in self.table_names}

    @torch.no_grad()
    def refresh(self, source: nn.Module) -> None:
        """Folds a float student's current weights into the served one."""
        source_state = source.state_dict()
        tables = [source_state[n].float() for n in self.table_names]
        torch._foreach_lerp_(list(self.master.values()), tables, 1.0 - self.decay)
        quantized = {n: quantize_rows(self.master[n]) for n in self.table_names}
        self.served.load_state_dict(quantized, strict=False)
        dense = [
            (param, source_state[name])
            for name, param in self.served.named_parameters()
            if name in source_state and param.is_floating_point()
        ]
        if dense:
            targets, values = zip(*dense)
            torch._foreach_lerp_(list(targets), [v.float() for v in values], 1.0 - self.decay)
