"""The Llama 3 decoder, in reading order: norm, rotary embedding, attention, FFN, block, model.

Rotary embeddings use the rotate-half layout (as transformers does); Meta and GGUF
checkpoints are permuted into it on import (model/checkpoint.py).

Attention paths:
  * plain causal (training, full recompute): SDPA with is_causal;
  * packed documents (`positions` restart at 0 per document): a block-diagonal causal
    mask on CPU, flex_attention with a block mask on CUDA;
  * ragged rows (model/ragged.py, the eval scorer's packed rows): flat tokens for every matmul;
    attention runs herd's C kernel on CPU in fp32 (only the visible pairs), else SDPA on padded
    rows;
  * a KV cache (generation: model/kv_cache.py; serving: the paged model/paged_cache.py): each
    row writes at its own length, so rows of different lengths share one step, and the cache
    runs the attention (`cache.attend`). On CPU, inference of a fused model (fuse_projections)
    hands one-token steps to herd's C kernels (model/cpu_kernels.py), which read either cache:
    one sequence runs its whole step as one call, several run each layer's attention as one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, RopeScaling
from model.cpu_kernels import attention_step, decode_step, gemv, ragged_attention
from model.cpu_kernels import rms_norm as rms_norm_kernel
from model.kv_cache import KVCache
from model.paged_cache import PagedKVCache
from model.ragged import RaggedRows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = rms_norm_kernel(x, self.weight, self.eps)  # CPU inference: one call, not torch's ~10 ops
        if y is not None:
            return y
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)  # one kernel: decode is op-bound
        # Normalise in float32 whatever the activation dtype: bf16 variance underflows.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape (B, T, 1, head_dim) for arbitrary per-token positions (heads on dim 2)."""
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2), float32 like the reference
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for inference. One row on CPU (decode is bound by reading weights) goes through
    herd's gemv kernel (model/cpu_kernels.py: bf16 ~2x, fp32 ~1.1x torch's mv here), else, in bf16,
    through mv (it reads the weight ~1.3x faster than F.linear). Several rows use `packed`, the
    weight in oneDNN's blocked layout (pack_weight), when given: the same matmul without re-laying
    the weight out at every call (bf16: the same numbers, SmolLM2's 32-row output projection ~2.5x
    faster alone; fp32: oneDNN's kernels instead of MKL's sgemm, the sums in another order, ~1.1-1.3x
    faster at hundreds of rows, more at a few; bench/results)."""
    if x.device.type == "cpu":
        if x.numel() == x.shape[-1]:
            y = gemv(weight, x.reshape(-1))
            if y is None and x.dtype == torch.bfloat16:
                y = torch.mv(weight, x.reshape(-1))
            if y is not None:
                return y.view(*x.shape[:-1], weight.shape[0])
        if packed is not None and x.dtype == weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return F.linear(x, weight)


def pack_weight(weight: torch.Tensor, batch_hint: int = 32) -> torch.Tensor | None:
    """A float32 or bfloat16 CPU weight laid out once for oneDNN's matmul (None where that does not
    apply: other devices and dtypes, no oneDNN, no oneDNN bf16 on this CPU)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


def doc_ids_from_positions(positions: torch.Tensor) -> torch.Tensor:
    """Packed sequences mark each document start with position 0."""
    return (positions == 0).cumsum(dim=-1)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: attend to earlier tokens of the same document only."""
    T = doc_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


_compiled_flex = None


def flex_document_block_mask(doc_ids: torch.Tensor):
    """The CUDA form of document_causal_mask: a flex_attention BlockMask, built once per forward."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    B, T = doc_ids.shape
    return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)


def flex_attention(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention as flex

    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex, dynamic=False)  # uncompiled flex is a slow reference path
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.wqkv: torch.Tensor | None = None  # set by Transformer.fuse_projections (inference)
        self.packed: dict[str, torch.Tensor] = {}  # fuse_projections(pack=True): oneDNN layouts

    def forward(self, x, cos, sin, mask=None, cache: KVCache | PagedKVCache | None = None):
        """mask: None (causal), a bool tensor, a BlockMask or RaggedRows; a cache masks its own steps."""
        B, T, _ = x.shape
        if self.wqkv is not None:  # inference: one matmul, and one rotary pass over the q and k heads
            qkv = linear(x, self.wqkv, self.packed.get("wqkv"))
            nq, nk = self.wq.out_features // self.head_dim, self.wk.out_features // self.head_dim
            if cache is not None and T == 1 and x.device.type == "cpu":  # batched decode: one C call
                out = attention_step(qkv, cos, sin, cache, self.layer_idx, nq)
                if out is not None:
                    return linear(out.view(B, T, -1), self.wo.weight, self.packed.get("wo"))
            if isinstance(mask, RaggedRows) and x.device.type == "cpu":  # rotates qkv in place: ours
                out = ragged_attention(qkv, cos, sin, mask, nq, nk)
                if out is not None:
                    return linear(out.view(B, T, -1), self.wo.weight, self.packed.get("wo"))
            qkv = qkv.view(B, T, -1, self.head_dim)
            qk = apply_rope(qkv[:, :, : nq + nk], cos, sin)
            q, k, v = qk[:, :, :nq], qk[:, :, nq:], qkv[:, :, nq + nk :]
        else:
            # -1 heads: under tensor parallelism each rank holds n_heads / tp of them.
            q = apply_rope(self.wq(x).view(B, T, -1, self.head_dim), cos, sin)
            k = apply_rope(self.wk(x).view(B, T, -1, self.head_dim), cos, sin)
            v = self.wv(x).view(B, T, -1, self.head_dim)
        if isinstance(mask, RaggedRows):  # flat (1, N) tokens: attention alone runs on padded rows
            groups, at = mask.padded
            outs = []
            for index, group_mask in groups:
                qg, kg, vg = (t[0][index].transpose(1, 2) for t in (q, k, v))
                out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group_mask, enable_gqa=True)
                outs.append(out.transpose(1, 2).flatten(0, 1))
            out = torch.cat(outs)[at].view(B, T, -1)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                out = cache.attend(self.layer_idx, q, k, v)
            elif mask is not None and not torch.is_tensor(mask):
                out = flex_attention(q, k, v, mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            out = out.transpose(1, 2).reshape(B, T, -1)
        return linear(out, self.wo.weight, self.packed.get("wo")) if self.wqkv is not None else self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w13: torch.Tensor | None = None  # set by Transformer.fuse_projections (inference)
        self.packed: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if self.w13 is not None:
            gate, up = linear(x, self.w13, self.packed.get("w13")).chunk(2, dim=-1)
            return linear(F.silu(gate) * up, self.w2.weight, self.packed.get("w2"))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.packed: dict[str, torch.Tensor] = {}
        self.init_rope()

    def init_rope(self) -> None:
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        with torch.device("cpu"):
            self.inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)

    @torch.no_grad()
    def fuse_projections(self, pack: bool = False) -> Transformer:
        """Inference: one matmul for q/k/v and one for gate/up per layer (fewer kernel launches in
        decode). The separate weights become views into the fused tensors, so memory does not grow
        and state_dict() keeps its names. Call after placing the model (device, dtype); not for training.

        pack: also keep CPU weights (fp32 or bf16) in oneDNN's layout for several rows at a time (a
        server's batched decode, the eval scorer's packed prefill), at the cost of a second copy of
        the weights."""

        def fuse(linears):
            fused = torch.cat([lin.weight for lin in linears])
            for lin, part in zip(linears, fused.split([lin.out_features for lin in linears])):
                lin.weight = nn.Parameter(part, requires_grad=False)
            return fused

        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            # Fuse again unless the weights still are views into the fused tensors (.to() replaces them).
            if attn.wqkv is None or attn.wqkv.data_ptr() != attn.wq.weight.data_ptr():
                attn.wqkv = fuse([attn.wq, attn.wk, attn.wv])
            if ffn.w13 is None or ffn.w13.data_ptr() != ffn.w1.weight.data_ptr():
                ffn.w13 = fuse([ffn.w1, ffn.w3])
            if pack:
                for module, weights in (
                    (attn, {"wqkv": attn.wqkv, "wo": attn.wo.weight}),
                    (ffn, {"w13": ffn.w13, "w2": ffn.w2.weight}),
                ):
                    module.packed = {k: p for k, w in weights.items() if (p := pack_weight(w)) is not None}
        if pack and (p := pack_weight(self.output_weight)) is not None:
            self.packed = {"output": p}
        return self

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """The output projection of (normed) hidden states: logits."""
        return linear(h, self.output_weight, self.packed.get("output"))

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """From-scratch init (model/init.py): N(0, std), residual projections scaled by depth,
        drawn in seeded blocks so that a sharded model gets the same values (seed None: random)."""
        from model.init import init_parameters

        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        init_parameters(
            ((n, p.data, p.shape, (0,) * p.dim()) for n, p in self.named_parameters()), self.config.n_layers, seed, std
        )

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | PagedKVCache | None = None,
        last_only: bool = False,
        head=None,
        attn_mask: torch.Tensor | RaggedRows | None = None,
    ) -> torch.Tensor:
        """Logits for `tokens` (B, T).

        positions: per-token positions; in packed training data they restart at 0 at
          every document start, which also switches on document masking.
        doc_ids: explicit document ids (alternative to restarting positions).
        cache: write the new keys/values at each row's length and attend to the cache (a KVCache: the
          caller advances the lengths once the step is accepted; a PagedKVCache: set up by set_step).
        last_only: return logits for the last position only (prefill during generation).
        head: training hook, `head(hidden, output_weight)` replaces the output projection and
          its result is returned (e.g. a loss fused with the projection, so the full logits
          are never materialised). It runs inside forward, where sharded (FSDP) parameters
          are gathered.
        attn_mask: an explicit (B, 1, T, T) bool mask, query t sees key j where True, or RaggedRows
          for flat (1, N) tokens, with `positions` (no cache): several continuations of one context
          packed into one row, each seeing the context and its own tokens (flows/eval/scoring.py).
        """
        B, T = tokens.shape
        mask = None
        if cache is not None:
            positions = cache.positions(T)
            if B == T == 1 and head is None and tokens.device.type == "cpu":
                logits = decode_step(self, tokens, cache)  # one C call for the whole step, where it applies
                if logits is not None:
                    return logits
        elif attn_mask is not None:
            if positions is None:
                raise ValueError("attn_mask needs explicit positions")
            mask = attn_mask
        elif positions is None and doc_ids is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        else:
            if positions is None:
                positions = torch.arange(T, device=tokens.device).expand(B, T)
            if doc_ids is None:
                doc_ids = doc_ids_from_positions(positions)
            mask = flex_document_block_mask(doc_ids) if tokens.is_cuda else document_causal_mask(doc_ids)

        if self.inv_freq.device != tokens.device:
            self.inv_freq = self.inv_freq.to(tokens.device)
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, self.inv_freq, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        if last_only:
            h = h[:, -1:]
        if head is not None:
            return head(self.norm(h), self.output_weight)
        return self.project(self.norm(h))
