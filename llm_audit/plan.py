"""Stage 1 (continued): the planner for every supported layout, dense, quantized and MoE.

Groups each quantized weight with its scales into one :class:`MatrixJob` (the scales are
consumed with it, never analysed), dispatching on ``config.json``'s
``quantization_config.quant_method`` rather than on tensor suffixes alone, and splits expert
stacks into one job per expert so that one expert is decoded at a time.

Row names (the ``name`` column):
- a tensor that is one matrix keeps its name (``...experts.7.w1.weight`` in Mixtral, expert 7);
- expert e of a stacked tensor is ``<tensor>[e]`` with gpt-oss's ``_blocks`` dropped
  (``model.layers.0.mlp.experts.down_proj[3]``), so MXFP4 and BF16 copies of a model agree;
- gpt-oss's fused, row-interleaved ``gate_up_proj`` gives ``...gate_up_proj[3].gate`` (module
  ``gate_proj``, rows 0, 2, 4, ...) and ``...gate_up_proj[3].up`` (``up_proj``, odd rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .routing import (
    FLOAT_DTYPES,
    MatrixJob,
    Skipped,
    is_ignored,
    parse_expert,
    parse_layer,
    parse_module,
)
from .safetext import clip
from .source import TensorInfo

SUPPORTED_METHODS = ("mxfp4", "fp8", "compressed-tensors", "fbgemm_fp8")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
#: companion suffix -> suffix of the weight it belongs to
COMPANIONS = (("_scales", "_blocks"), (".weight_scale_inv", ".weight"),
              (".weight_scale", ".weight"), (".input_scale", ".weight"),
              (".weight_zero_point", ".weight"), (".weight_shape", ".weight"))
GATE_UP = ("gate_proj", "up_proj")  # gpt-oss's interleaved order: row 2i gate, row 2i+1 up


def quant_method(config: Mapping) -> str | None:
    """``quantization_config.quant_method`` of a config.json dict, lower case, or None."""
    qc = config.get("quantization_config") if isinstance(config, Mapping) else None
    method = qc.get("quant_method") if isinstance(qc, Mapping) else None
    return str(method).lower() if method else None


def owner_name(name: str) -> str:
    """The weight a companion tensor (scales, zero points) belongs to; a weight is its own."""
    for suffix, weight_suffix in COMPANIONS:
        if name.endswith(suffix):
            return name[: -len(suffix)] + weight_suffix
    return name


def plan_checkpoint(tensors: tuple[TensorInfo, ...],
                    config: Mapping) -> tuple[list[MatrixJob], list[Skipped]]:
    """Matrix jobs and skipped tensors of a checkpoint, in file order."""
    method = quant_method(config)
    gpt_oss = config.get("model_type") == "gpt_oss" or method == "mxfp4"
    by_name = {t.name: t for t in tensors}
    jobs: list[MatrixJob] = []
    skipped: list[Skipped] = []
    for t in tensors:
        owner = owner_name(t.name)
        if owner != t.name:  # a companion: consumed with its weight
            if owner not in by_name and owner + "_packed" not in by_name and not is_ignored(t):
                skipped.append(Skipped(t.name, t.dtype, t.shape,
                                       f"scale tensor without its weight {owner!r}"))
            continue
        if is_ignored(t):
            continue
        if t.name.endswith("_blocks") and t.dtype == "U8":
            new_jobs, why = _plan_mxfp4(t, by_name, method)
        elif t.dtype in FLOAT_DTYPES:
            new_jobs, why = _plan_float(t, gpt_oss)
        elif t.dtype in FP8_DTYPES or t.dtype == "I8":
            new_jobs, why = _plan_scaled(t, by_name, method, config)
        else:
            new_jobs, why = [], _unknown_dtype(t, method)
        jobs.extend(new_jobs)
        if why:
            skipped.append(Skipped(t.name, t.dtype, t.shape, why))
    return jobs, skipped


def expert_slice(t: TensorInfo, e: int) -> TensorInfo:
    """Expert e of a stacked tensor [E, ...]: its contiguous byte range, same tensor name."""
    step = t.nbytes // t.shape[0]
    return TensorInfo(t.name, t.dtype, t.shape[1:], t.file, t.begin + e * step,
                      t.begin + (e + 1) * step)


def _per_expert(base: str, t: TensorInfo, scheme: str, companions: tuple[TensorInfo, ...],
                fused: tuple[str, ...], fused_dim: int,
                transposed: bool = False) -> list[MatrixJob]:
    layer, module = parse_layer(t.name), base.rsplit(".", 1)[-1]
    return [MatrixJob(f"{base}[{e}]", layer, module, scheme,
                      (expert_slice(t, e), *(expert_slice(c, e) for c in companions)),
                      expert=e, fused=fused, fused_dim=fused_dim, transposed=transposed)
            for e in range(t.shape[0])]


def _plan_float(t: TensorInfo, gpt_oss: bool) -> tuple[list[MatrixJob], str | None]:
    if min(t.shape[-2:]) < 2:
        return [], "fewer than 2 rows or columns"
    if len(t.shape) == 2:
        return [MatrixJob(t.name, parse_layer(t.name), parse_module(t.name), "dense", (t,),
                          expert=parse_expert(t.name))], None
    if len(t.shape) == 3 and ".experts." in f".{t.name}":
        base = t.name.removesuffix(".weight")
        fused = GATE_UP if gpt_oss and base.endswith("gate_up_proj") else ()
        # gpt-oss stores BF16 experts as (in, out), gate/up alternating along the columns:
        # decoded transposed to (out, in), as its MXFP4 copy, then split along the rows
        return _per_expert(base, t, "dense", (), fused, fused_dim=0, transposed=gpt_oss), None
    return [], f"{len(t.shape)}-D tensor with no known expert layout"


def _plan_mxfp4(t: TensorInfo, by_name: Mapping[str, TensorInfo],
                method: str | None) -> tuple[list[MatrixJob], str | None]:
    base = t.name.removesuffix("_blocks")
    scales = by_name.get(base + "_scales")
    if method != "mxfp4":
        return [], (f"U8 '_blocks' tensor looks like MXFP4 but config.json's "
                    f"quantization_config.quant_method is {method!r}, not 'mxfp4'; put the "
                    "model's config.json next to the weights")
    if scales is None:
        return [], f"MXFP4 blocks without their scales {base + '_scales'!r}"
    if scales.dtype != "U8" or len(t.shape) not in (3, 4) or t.shape[-1] != 16 \
            or tuple(scales.shape) != tuple(t.shape[:-1]):
        return [], (f"MXFP4 blocks {list(t.shape)} and scales {scales.dtype} "
                    f"{list(scales.shape)} do not match (need [..., G, 16] and U8 [..., G])")
    fused = GATE_UP if base.endswith("gate_up_proj") else ()
    if len(t.shape) == 3:
        return [MatrixJob(base, parse_layer(t.name), base.rsplit(".", 1)[-1], "mxfp4",
                          (t, scales), expert=parse_expert(t.name), fused=fused)], None
    return _per_expert(base, t, "mxfp4", (scales,), fused, fused_dim=0), None


def _plan_scaled(t: TensorInfo, by_name: Mapping[str, TensorInfo], method: str | None,
                 config: Mapping) -> tuple[list[MatrixJob], str | None]:
    if len(t.shape) != 2:
        return [], f"{len(t.shape)}-D {t.dtype} tensor with no known layout"
    scale_inv, scale = by_name.get(t.name + "_scale_inv"), by_name.get(t.name + "_scale")
    if method not in SUPPORTED_METHODS:
        return [], _unknown_dtype(t, method)
    if method == "fp8" and scale_inv is not None and t.dtype in FP8_DTYPES:
        return _fp8_block_job(t, scale_inv, config)
    if method in ("compressed-tensors", "fbgemm_fp8") and scale is not None:
        if t.name + "_zero_point" in by_name:
            return [], "asymmetric (zero-point) quantization is not supported"
        if not _scale_fits(scale.shape, t.shape):
            return [], (f"weight_scale {list(scale.shape)} does not fit the weight (need [1], "
                        "[rows, 1] or [rows, groups])")
        scheme = "int8_scaled" if t.dtype == "I8" else "fp8_scaled"
        return [MatrixJob(t.name, parse_layer(t.name), parse_module(t.name), scheme,
                          (t, scale), expert=parse_expert(t.name))], None
    have = "weight_scale_inv" if scale_inv is not None else "weight_scale" if scale is not None \
        else "no scale tensor"
    return [], f"{t.dtype} weight with {have} does not match quant_method {method!r}"


def _fp8_block_job(t: TensorInfo, scale_inv: TensorInfo,
                   config: Mapping) -> tuple[list[MatrixJob], str | None]:
    qc = config.get("quantization_config")
    block = (qc.get("weight_block_size") if isinstance(qc, Mapping) else None) or [128, 128]
    if not isinstance(block, list) or block != [128, 128]:
        return [], f"weight_block_size {clip(block)} is not supported (only [128, 128])"
    want = [math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128)]
    if list(scale_inv.shape) != want:
        return [], (f"weight_scale_inv {list(scale_inv.shape)} does not match 128x128 blocks of "
                    f"{list(t.shape)} (need {want})")
    return [MatrixJob(t.name, parse_layer(t.name), parse_module(t.name), "fp8_block128",
                      (t, scale_inv), expert=parse_expert(t.name))], None


def _scale_fits(scale: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    if math.prod(scale) == 0:  # an empty scale fits nothing (and must not divide by zero)
        return False
    if math.prod(scale) == 1:
        return True
    if len(scale) == 1:
        return scale[0] == weight[0]
    return len(scale) == 2 and scale[0] == weight[0] and weight[1] % scale[1] == 0


def _unknown_dtype(t: TensorInfo, method: str | None) -> str:
    if method is None:
        return (f"dtype {t.dtype} needs a quantization scheme but config.json has no "
                "quantization_config.quant_method; put the model's config.json next to it")
    if method not in SUPPORTED_METHODS:
        return (f"quant_method {method!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_METHODS)})")
    return f"dtype {t.dtype} is not decodable under quant_method {method!r}"
