"""INT8 student: row-wise INT8 embedding tables, and INT8 dense layers where it pays.

Embedding tables go through TorchRec's ``quantize_embeddings`` (FBGEMM row-wise
INT8: one scale and offset per row). Scoring is dominated by the click head
(``models.network.PairHead``) over every user-candidate pair, which
``Int8PairHead`` runs in static INT8: activation scales calibrated once on real
batches, INT8 activations from the head's input to its last hidden layer.
PyTorch's dynamic INT8 ``Linear`` (``quantize_dense``), which measures each
activation's range per call, is kept as an option; at this model's width it
was measured no faster than float32.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings

import torch
import torch.ao.nn.intrinsic.quantized as nniq
from torch import nn
from torch.ao.quantization import QConfig, QuantStub, convert, fuse_modules, prepare
from torch.ao.quantization.observer import (
    FixedQParamsObserver,
    HistogramObserver,
    PerChannelMinMaxObserver,
    default_per_channel_weight_observer,
)
from torchrec import EmbeddingBagCollection
from torchrec.inference.modules import quantize_embeddings
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from models.network import Batch, PairHead, RecNetwork, head_segments

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


# FBGEMM's AVX2 kernels add pairs of uint8 x int8 products in saturating
# int16 (its AVX-512 VNNI kernels do not, but a saved student may be served on
# either), so no pair may exceed 32767. Activation codes use all 8 bits and
# the weights 7 (255 * 64 * 2 = 32640), which holds for any input: PyTorch's
# usual ``reduce_range`` (7-bit activations) only fits the calibrated range in
# 0..127, and an activation past it still gets a code up to 255.
INPUT_ZERO_POINT = 128
WEIGHT_RANGE = (-64, 63)
SEGMENTS = 5
# User-candidate pairs whose input codes are made at once (see ``_codes``).
CODE_ROWS = 16384


class Int8PairHead(nn.Module):
    """The click head in static INT8, called like ``PairHead``.

    Each of the head's five input parts (see ``head_segments``) is quantized
    with its own calibrated scale into 8-bit codes written side by side into
    one uint8 ``[B, N, 5 * D]`` buffer: the float concatenation is never built,
    and the user and item parts are quantized once per user and per item, not
    per pair. The part scales are folded into the first layer's weight
    columns, so that layer reads the codes with a scale of 1. The two hidden
    layers are FBGEMM quantized ``Linear`` + ReLU with per-channel 7-bit
    weights (see ``WEIGHT_RANGE``), passing uint8 activations from one to the
    next; the 2-output last layer runs in float32 on the dequantized last
    hidden layer, so the logits are not rounded to 8 bits.

    ``Int8Refresher`` refreshes it from a float32 master of its weights; the
    activation scales stay those of the calibration.

    Build one with :meth:`calibrated`; the constructor makes the structure
    that a saved state is loaded into.

    It is built on torch's eager-mode quantized modules and quint8 tensors,
    which torch 2.13 marks deprecated (it warns when a head is built): a torch
    that drops them needs this head ported to torchao's PT2E quantization.

    Args:
        dim: the width ``D`` of each part.
        hidden: the first hidden layer's width (the second is half of it).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("segment_scales", torch.ones(SEGMENTS))
        self.hidden = nn.Sequential(
            nniq.LinearReLU(SEGMENTS * dim, hidden), nniq.LinearReLU(hidden, hidden // 2)
        )
        self.out = nn.Linear(hidden // 2, 2)

    @classmethod
    @torch.no_grad()
    def calibrated(cls, head: PairHead, samples: list[tuple[torch.Tensor, ...]]) -> "Int8PairHead":
        """The INT8 version of a float ``head``.

        Args:
            head: ``Linear, ReLU, Linear, ReLU, Linear``, as ``PairHead``.
            samples: ``(user, items, interest)`` inputs of the head on real
                batches (see :func:`head_inputs`): the part scales come from
                their largest magnitudes, the hidden activation scales from
                histograms of the hidden layers on them.
        """
        first, _, second, _, last = head
        quantized = cls(first.in_features // SEGMENTS, first.out_features)
        largest = torch.zeros(SEGMENTS)
        for sample in samples:
            for k, part in enumerate(head_segments(*sample)):
                largest[k] = torch.maximum(largest[k], part.abs().max())
        # The largest magnitude maps to 127 codes either side of the zero point.
        scales = largest.clamp(min=1e-8) / (255 - INPUT_ZERO_POINT)
        quantized.segment_scales.copy_(scales)

        # Float layers that take the codes minus the zero point: the part
        # scales are folded into the first layer's columns.
        folded = nn.Sequential(
            QuantStub(), copy.deepcopy(first), nn.ReLU(), copy.deepcopy(second), nn.ReLU()
        )
        folded[1].weight.mul_(scales.repeat_interleave(quantized.dim)[None, :])
        fuse_modules(folded, [["1", "2"], ["3", "4"]], inplace=True)
        low, high = WEIGHT_RANGE
        folded.qconfig = QConfig(
            activation=HistogramObserver.with_args(reduce_range=False),
            weight=PerChannelMinMaxObserver.with_args(
                dtype=torch.qint8,
                qscheme=torch.per_channel_symmetric,
                quant_min=low,
                quant_max=high,
            ),
        )
        folded[0].qconfig = QConfig(
            activation=FixedQParamsObserver.with_args(
                scale=1.0, zero_point=INPUT_ZERO_POINT, dtype=torch.quint8
            ),
            weight=default_per_channel_weight_observer,
        )
        with warnings.catch_warnings():
            # Eager-mode quantization is deprecated in favour of torchao.
            warnings.simplefilter("ignore")
            prepare(folded, inplace=True)
            for sample in samples:
                folded(quantized._codes(*sample).float() - INPUT_ZERO_POINT)
            convert(folded, inplace=True)
        quantized.hidden = nn.Sequential(folded[1], folded[3])
        quantized.out.load_state_dict(last.state_dict())
        return quantized.eval()

    def _codes(self, user, items, interest) -> torch.Tensor:
        """The head's input as codes, uint8 ``[B, N, 5 * D]``.

        The per-pair parts (interest and the two products) are made a few
        users at a time (``CODE_ROWS`` pairs): quantizing goes through a float
        product and an integer copy, and those temporaries stay small.
        """
        d = self.dim
        users, n = items.shape[:2]
        codes = torch.empty(users, n, SEGMENTS * d, dtype=torch.uint8)
        scales = self.segment_scales.tolist()
        user = user[:, None, :]
        if users > 1 and items.stride(0) == 0:
            items = items[:1]  # the same candidates for every user: quantize once
        with warnings.catch_warnings():
            # quint8 tensors are deprecated; FBGEMM's quantized Linear takes them.
            warnings.simplefilter("ignore")
            codes[..., :d] = _quantized_codes(user, scales[0])
            codes[..., d : 2 * d] = _quantized_codes(items, scales[1])
            step = max(1, CODE_ROWS // max(n, 1))
            for start in range(0, users, step):
                rows = slice(start, start + step)
                chunk, interest_rows = codes[rows], interest[rows]
                item_rows = items if items.shape[0] == 1 else items[rows]
                chunk[..., 2 * d : 3 * d] = _quantized_codes(interest_rows, scales[2])
                chunk[..., 3 * d : 4 * d] = _quantized_codes(user[rows] * item_rows, scales[3])
                chunk[..., 4 * d :] = _quantized_codes(interest_rows * item_rows, scales[4])
        return codes

    def forward(self, user, items, interest):
        codes = self._codes(user, items, interest)
        # The codes as a quantized tensor, without a copy; the part scales are
        # in the first layer's weights.
        inputs = torch._make_per_tensor_quantized_tensor(codes, 1.0, INPUT_ZERO_POINT)
        return self.out(self.hidden(inputs).dequantize())


class _HeadMaster:
    """Float32 master of a static INT8 head's hidden layers, for refreshes.

    The first layer's weight columns carry the input parts' scales (see
    ``Int8PairHead``); the master holds them unfolded, as in the float head.
    """

    def __init__(self, head: Int8PairHead):
        self.head = head
        # [1, 5 * D]: the scale folded into each input column.
        self.columns = head.segment_scales.repeat_interleave(head.dim)[None, :]
        first, second = head.hidden
        self.weights = [first.weight().dequantize() / self.columns]
        self.weights.append(second.weight().dequantize())
        self.biases = [first.bias().detach().clone(), second.bias().detach().clone()]

    @torch.no_grad()
    def refresh(self, source: PairHead, weight: float) -> None:
        """Folds the float ``source`` head in with ``weight`` and requantizes."""
        first, _, second, _, last = source
        masters = self.weights + self.biases
        values = [first.weight, second.weight, first.bias, second.bias]
        torch._foreach_lerp_(masters, [v.detach().float() for v in values], weight)
        folded = (self.weights[0] * self.columns, self.weights[1])
        for layer, matrix, bias in zip(self.head.hidden, folded, self.biases, strict=True):
            layer.set_weight_bias(quantize_channels(matrix), bias.clone())
        self.head.out.weight.lerp_(last.weight.float(), weight)
        self.head.out.bias.lerp_(last.bias.float(), weight)


def quantize_channels(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` float weights as per-channel symmetric qint8 in
    ``WEIGHT_RANGE``, the scale of each output row from its largest magnitude
    (as ``PerChannelMinMaxObserver`` derives it)."""
    low, high = WEIGHT_RANGE
    scale = weight.abs().amax(1).clamp(min=1e-8) / ((high - low) / 2)  # [out]
    codes = torch.round(weight / scale[:, None]).clamp(low, high).to(torch.int8)
    zero = torch.zeros(len(scale), dtype=torch.int64)
    return torch._make_per_channel_quantized_tensor(codes, scale.double(), zero, 0)


def _quantized_codes(values: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.quantize_per_tensor(values, scale, INPUT_ZERO_POINT, torch.quint8).int_repr()


@torch.no_grad()
def head_inputs(model: RecNetwork, batch: Batch, candidates: torch.Tensor) -> tuple:
    """``(user, items, interest)`` that ``model``'s head gets in
    ``score_candidates(batch, candidates)``."""
    seen = []

    def record(module, args):
        seen.append(args)

    handle = model.head.register_forward_pre_hook(record)
    try:
        model.score_candidates(batch, candidates)
    finally:
        handle.remove()
    return seen[0]


def quantize_head(
    model: RecNetwork, calibration: list[Batch], candidates: torch.Tensor
) -> RecNetwork:
    """A copy of ``model`` with its head in static INT8, calibrated on
    ``calibration`` batches scored against ``candidates``."""
    samples = [head_inputs(model, batch, candidates) for batch in calibration]
    quantized = copy.deepcopy(model).eval()
    quantized.head = Int8PairHead.calibrated(model.head, samples)
    return quantized


def with_int8_head(model: RecNetwork) -> RecNetwork:
    """``model`` with an uncalibrated ``Int8PairHead``, to load a saved state into."""
    config = model.config
    model.head = Int8PairHead(config.embedding_dim, config.hidden_dim)
    return model


DENSE_CHOICES = ("auto", "static", "dynamic", "always", "never")


def quantize_student(
    model: RecNetwork,
    sample: Batch,
    candidates: torch.Tensor,
    dense: str = "auto",
    calibration: list[Batch] | None = None,
) -> tuple[nn.Module, dict]:
    """INT8 student, and a record of what was quantized and why.

    Args:
        sample: a batch for timing the dense choice.
        candidates: item indices scored per user in the timing and the
            calibration (serving's shape).
        dense: ``"static"`` (``Int8PairHead``), ``"dynamic"`` (dynamic INT8
            ``Linear`` layers; ``"always"`` is the same), ``"never"``, or
            ``"auto"``: static when it is measured faster than float32.
        calibration: batches for the static head's scales; ``[sample]`` when
            not given.
    """
    if dense not in DENSE_CHOICES:
        raise ValueError(f"dense must be one of {', '.join(DENSE_CHOICES)}, got {dense!r}")
    tables = quantize_tables(model)
    info = {"embedding_tables": "int8 row-wise", "dense": "float32"}
    if dense == "never":
        return tables, info
    if dense in ("dynamic", "always"):
        info["dense"] = "int8 dynamic"
        return quantize_dense(tables), info
    static = quantize_head(tables, calibration or [sample], candidates)
    if dense == "static":
        info["dense"] = "int8 static head"
        return static, info
    float_ms, int8_ms = _time_interleaved([tables, static], sample, candidates)
    info.update(dense_float_ms=float_ms, dense_int8_ms=int8_ms)
    if int8_ms < 0.9 * float_ms:
        info["dense"] = "int8 static head"
        return static, info
    logger.info(
        "keeping float32 dense layers: INT8 scoring took %.1f ms against %.1f ms",
        int8_ms,
        float_ms,
    )
    return tables, info


@torch.no_grad()
def _time_interleaved(
    models: list[nn.Module], sample: Batch, candidates: torch.Tensor, repeats: int = 5
) -> list[float]:
    """Best-of-``repeats`` scoring milliseconds of each model, the models
    taking turns so that a busy spell slows them alike."""
    for model in models:
        model.score_candidates(sample, candidates)  # warm-up
    best = [float("inf")] * len(models)
    for _ in range(repeats):
        for i, model in enumerate(models):
            start = time.perf_counter()
            model.score_candidates(sample, candidates)
            best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1000 for b in best]


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

    The master starts as the dequantized served tables. Dense layers that stay
    float32 in the served student are averaged in place. A static INT8 head
    (``Int8PairHead``) gets the tables' treatment: a float32 master of its
    hidden layers' weights, requantized per output channel at each refresh;
    its activation scales stay those of its calibration, so a student that
    drifts far from it is better quantized afresh.

    Args:
        served: the INT8 student (tables quantized by ``quantize_tables``,
            optionally with ``quantize_head``).
        decay: the EMA decay of a refresh.

    Raises:
        ValueError: the served student's dense layers are dynamic INT8.
    """

    def __init__(self, served: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        state = served.state_dict()
        head = getattr(served, "head", None)
        self.head = _HeadMaster(head) if isinstance(head, Int8PairHead) else None
        refreshable = ("head.hidden.",) if self.head is not None else ()
        packed = [n for n in state if "_packed_params" in n]
        if any(not n.startswith(refreshable) for n in packed):
            raise ValueError(
                "refresh needs float or static INT8 dense layers; quantize with "
                "dense='never' or 'static', or re-quantize from the float student"
            )
        self.served, self.decay = served, decay
        self.table_names = [
            n
            for n, t in state.items()
            if isinstance(t, torch.Tensor) and t.dtype == torch.uint8
        ]
        self.master = {n: dequantize_rows(state[n]) for n in self.table_names}
        # The served tables' own storage (state_dict tensors share it): each
        # refresh writes into it. ``load_state_dict`` with only the tables
        # would trip a quantized head's loader, which wants all of its keys.
        self._served_tables = {n: state[n] for n in self.table_names}

    @torch.no_grad()
    def refresh(self, source: nn.Module) -> None:
        """Folds a float student's current weights into the served one."""
        source_state = source.state_dict()
        tables = [source_state[n].float() for n in self.table_names]
        torch._foreach_lerp_(list(self.master.values()), tables, 1.0 - self.decay)
        for name, served in self._served_tables.items():
            served.copy_(quantize_rows(self.master[name]))
        dense = [
            (param, source_state[name])
            for name, param in self.served.named_parameters()
            if name in source_state and param.is_floating_point()
        ]
        if self.head is not None:
            self.head.refresh(source.head, 1.0 - self.decay)
        if dense:
            targets, values = zip(*dense)
            torch._foreach_lerp_(list(targets), [v.float() for v in values], 1.0 - self.decay)
