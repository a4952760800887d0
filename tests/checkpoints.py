"""Synthetic checkpoints in real layouts (gpt-oss MXFP4, DeepSeek FP8, Mixtral/Qwen MoE),
written with our own encoders. Used by the tests and by benchmarks/memory_streaming.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP4_MIDPOINTS = (FP4[1:8] + FP4[:7]) / 2  # between consecutive magnitudes 0 .. 6


def encode_mxfp4(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., R, C] (C % 32 == 0) -> blocks U8 [..., R, C/32, 16], scales U8 [..., R, C/32].

    Per 32-block: scale 2^e with the smallest e such that max|w| / 2^e <= 6, each value rounded
    to the nearest FP4 magnitude (ties to the smaller), sign bit 3; low nibble = even position.
    """
    *lead, R, C = W.shape
    x = W.to(torch.float32).reshape(*lead, R, C // 32, 32)
    amax = x.abs().amax(-1).to(torch.float64)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax))
    e = e.clamp(-127, 127)
    q = x / torch.exp2(e).to(torch.float32).unsqueeze(-1)  # exact: a power of two
    mag = torch.bucketize(q.abs(), FP4_MIDPOINTS)  # nearest magnitude code 0..7
    codes = (mag | (torch.signbit(q).to(mag.dtype) << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (e + 127).to(torch.uint8)


def random_mxfp4_matrix(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """A float32 [..., R, C] matrix exactly representable in MXFP4 (random codes and scales)."""
    *lead, R, C = shape
    codes = torch.randint(0, 16, (*lead, R, C), generator=gen)
    exps = torch.randint(-3, 2, (*lead, R, C // 32), generator=gen).to(torch.float32)
    return FP4[codes] * torch.exp2(exps).repeat_interleave(32, dim=-1)


def encode_fp8_block(W: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """float [R, C] -> (F8_E4M3 [R, C], F32 scale_inv [ceil(R/b), ceil(C/b)]) with W ~= q * s."""
    R, C = W.shape
    s = torch.empty(math.ceil(R / block), math.ceil(C / block))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = W[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s[i, j] = max(float(blk.abs().max()), 1e-12) / 448.0
    full = s.repeat_interleave(block, 0)[:R].repeat_interleave(block, 1)[:, :C]
    return (W / full).to(torch.float8_e4m3fn), s


def write_sharded(folder: Path, items: list[tuple[str, torch.Tensor]], cuts: list[int],
                  config: dict) -> Path:
    """Write `items` (in order) as shards split before the indices in `cuts`, plus the index and
    config.json. Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [0, *cuts, len(items)]
    n = len(bounds) - 1
    weight_map = {}
    for k in range(n):
        shard = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        chunk = dict(items[bounds[k]:bounds[k + 1]])
        save_file({name: t.contiguous() for name, t in chunk.items()}, folder / shard,
                  metadata={"format": "pt"})
        weight_map.update({name: shard for name in chunk})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def gpt_oss_config(layers: int, width: int, experts: int, vocab: int) -> dict:
    return {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
            "num_hidden_layers": layers, "hidden_size": width, "intermediate_size": width,
            "num_local_experts": experts, "vocab_size": vocab,
            "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                "lm_head"]}}


def gpt_oss_layer(i: int, width: int, experts: int, gen: torch.Generator,
                  gate_up: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
    """One gpt-oss block in the HF layout (heads x head_dim = width, intermediate = width).
    `gate_up` [E, 2*width, width] overrides the fused expert weights (rows interleaved)."""
    p, bf = f"model.layers.{i}.", torch.bfloat16
    kv = max(width // 8, 32)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])).to(bf)

    if gate_up is None:
        gate_up = random_mxfp4_matrix(gen, experts, 2 * width, width)
    gu_blocks, gu_scales = encode_mxfp4(gate_up)
    dn_blocks, dn_scales = encode_mxfp4(random_mxfp4_matrix(gen, experts, width, width))
    return [
        (p + "input_layernorm.weight", torch.ones(width, dtype=bf)),
        (p + "self_attn.q_proj.weight", randn(width, width)),
        (p + "self_attn.q_proj.bias", torch.zeros(width, dtype=bf)),
        (p + "self_attn.k_proj.weight", randn(kv, width)),
        (p + "self_attn.v_proj.weight", randn(kv, width)),
        (p + "self_attn.o_proj.weight", randn(width, width)),
        (p + "self_attn.sinks", torch.zeros(max(width // 64, 1), dtype=bf)),
        (p + "post_attention_layernorm.weight", torch.ones(width, dtype=bf)),
        (p + "mlp.router.weight", randn(experts, width)),
        (p + "mlp.router.bias", torch.zeros(experts, dtype=bf)),
        (p + "mlp.experts.gate_up_proj_blocks", gu_blocks),
        (p + "mlp.experts.gate_up_proj_scales", gu_scales),
        (p + "mlp.experts.gate_up_proj_bias", torch.zeros(experts, 2 * width, dtype=bf)),
        (p + "mlp.experts.down_proj_blocks", dn_blocks),
        (p + "mlp.experts.down_proj_scales", dn_scales),
        (p + "mlp.experts.down_proj_bias", torch.zeros(experts, width, dtype=bf)),
    ]


def write_gpt_oss(folder: Path, *, layers: int = 2, width: int = 64, experts: int = 4,
                  vocab: int = 96, shards: int = 2, seed: int = 0,
                  gate_up0: torch.Tensor | None = None) -> Path:
    """A synthetic gpt-oss-layout checkpoint. Shard boundaries fall inside layers: with two
    shards, layer 0's `gate_up_proj_blocks` is in shard 1 and its `_scales` in shard 2."""
    gen = torch.Generator().manual_seed(seed)
    items = [("model.embed_tokens.weight",
              (torch.randn(vocab, width, generator=gen) * 0.02).to(torch.bfloat16))]
    for i in range(layers):
        items += gpt_oss_layer(i, width, experts, gen, gate_up0 if i == 0 else None)
    items += [("model.norm.weight", torch.ones(width, dtype=torch.bfloat16)),
              ("lm_head.weight", (torch.randn(vocab, width, generator=gen) * 0.02)
               .to(torch.bfloat16))]
    names = [n for n, _ in items]
    first = names.index("model.layers.0.mlp.experts.gate_up_proj_scales")
    per = max(len(items) // shards, 1)
    cuts = sorted({c for c in (first, *(first + k * per for k in range(1, shards - 1)))
                   if 0 < c < len(items)})
    return write_sharded(folder, items, cuts, gpt_oss_config(layers, width, experts, vocab))
