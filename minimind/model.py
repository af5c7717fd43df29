"""The MiniMind decoder: pre-norm, RMSNorm, RoPE (+YaRN), grouped-query attention with optional q/k-norm,
SwiGLU or mixture-of-experts feed-forward, and a KV cache. `MiniMindForCausalLM(ModelConfig.preset("tiny"))`.

Parameter names are transformers' (Qwen3 / Qwen3-MoE / Qwen2-MoE / Llama), so a state dict moves between the two as is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minimind import blocked_attention
from minimind.config import ModelConfig
from minimind.logprobs import token_logprobs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast: the mean of squares loses too much in 8 mantissa bits.
        # Cast back before the weight multiply, as transformers does, so logits match it closely.
        out = self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        if torch.is_autocast_enabled(x.device.type):
            # Every consumer (q/k/v, gate/up) would cast this to the autocast dtype on its own: do it once.
            out = out.to(torch.get_autocast_dtype(x.device.type))
        return out


# ---- rotary position embedding -------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies per rotary pair, and the factor cos/sin are scaled by (1.0 without YaRN)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_scaling != "yarn":
        return inv_freq, 1.0
    factor, orig = cfg.yarn_factor, cfg.yarn_original_max_position_embeddings

    # YaRN: pairs that rotate many times within the original context keep their frequency (extrapolate);
    # slow pairs are divided by `factor` (interpolate); a linear ramp blends the band in between.
    def pair_index(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_index(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(pair_index(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    scale = cfg.yarn_attention_factor
    if scale is None:
        scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, float(scale)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.reset()

    def reset(self) -> None:
        inv_freq, self.scale = rope_inv_freq(self.cfg)
        self.inv_freq = inv_freq.to(self.inv_freq.device) if self.inv_freq.device.type != "meta" else inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed from the positions each call (cheap) so any per-row offset, e.g. left padding, just works.
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        cos, sin = freqs.cos() * self.scale, freqs.sin() * self.scale
        # Rotate-half pairs dim i with i + D/2; the first half's partner enters negated, so fold that sign
        # into sin once here instead of negating activations in every layer.
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        # Cast to the activation dtype: fp32 cos/sin would promote bf16 activations and slow training.
        return cos[:, None].to(dtype), sin[:, None].to(dtype)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B, T] that restart at 0 wherever document_ids [B, T] changes value."""
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = F.pad(document_ids[:, 1:] != document_ids[:, :-1], (1, 0), value=True)
    return index - torch.where(starts, index, 0).cummax(-1).values


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B, H, T, D] with cos/sin [B, 1, T, D] from RotaryEmbedding (sin pre-signed)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


# ---- KV cache --------------------------------------------------------------------------------------


class KVCache:
    """Keys and values for every layer, allocated once for `max_len` positions and filled in place.

    It also remembers which cached positions are padding and each row's next RoPE position, so a batch of
    left-padded prompts decodes exactly like each prompt alone.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        self.rows = batch  # rows in use; pad_to may add idle rows after them
        self.has_padding = False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    # Continuous batching (minimind.serve.scheduler): rows leave and join a running batch. All rows share
    # one time axis ending at `length`; a row's own tokens are right-aligned on it and the positions before
    # them are invalid (padding), so each row still decodes as if alone.

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (a row may repeat, e.g. n samples of one prompt)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        self.k, self.v = self.k[:, index], self.v[:, index]
        self.valid, self.next_pos = self.valid[index], self.next_pos[index]
        self.rows = len(rows)
        self._relayout(self.length, self.max_len)

    def join(self, other: KVCache, extra: int = 0) -> None:
        """Append the rows of `other`, right-aligned with ours; keep room for `extra` more positions."""
        for cache in (self, other):
            if cache.k.shape[1] > cache.rows:
                cache.keep(list(range(cache.rows)))  # idle rows from pad_to go first
        length = max(self.length, other.length)
        parts = [self._aligned(length, length + extra), other._aligned(length, length + extra)]
        self.k, self.v, self.valid = (torch.cat([a[i] for a in parts], 1 if i < 2 else 0) for i in range(3))
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.rows += other.rows
        self.length, self.max_len = length, length + extra
        self._relayout(self.length, self.max_len)

    def reserve(self, n: int, chunk: int = 64) -> None:
        """Make room for n more positions: drop leading positions no row uses, then grow by whole chunks."""
        self._relayout(self.length, self.max_len)
        if self.length + n > self.max_len:
            grown = self.length + n + chunk - 1
            self._relayout(self.length, grown - grown % chunk)

    def pad_to(self, batch: int, max_len: int) -> None:
        """Fixed shapes for a compiled decode step: `batch` rows (idle ones after the rows in use: every
        position valid, so their attention stays finite; nobody reads them) and max_len positions."""
        idle = batch - self.k.shape[1]
        if idle > 0:
            zeros = self.k.new_zeros(self.k.shape[0], idle, *self.k.shape[2:])
            self.k, self.v = torch.cat([self.k, zeros], 1), torch.cat([self.v, zeros], 1)
            self.valid = torch.cat([self.valid, self.valid.new_ones(idle, self.max_len)])
            self.next_pos = torch.cat([self.next_pos, self.next_pos.new_zeros(idle)])
        if max_len > self.max_len:
            k, v, valid = self._aligned(self.length, max_len)
            self.k, self.v, self.valid, self.max_len = k, v, valid, max_len

    def _aligned(self, length: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v and valid re-laid so our `self.length` positions end at `length`, with room for max_len."""
        shift = length - self.length
        k = self.k.new_zeros(self.k.shape[:3] + (max_len,) + self.k.shape[4:])
        v = torch.zeros_like(k)
        valid = torch.ones(self.valid.shape[0], max_len, dtype=torch.bool, device=self.valid.device)
        valid[:, :shift] = False
        k[:, :, :, shift:length] = self.k[:, :, :, :self.length]
        v[:, :, :, shift:length] = self.v[:, :, :, :self.length]
        valid[:, shift:length] = self.valid[:, :self.length]
        return k, v, valid

    def _relayout(self, length: int, max_len: int) -> None:
        """Drop leading positions that are padding in every row; hold max_len positions in all."""
        used = self.valid[:self.rows, :length].any(0)  # idle rows (pad_to) use nothing
        start = int(used.long().argmax()) if bool(used.any()) else length
        if start == 0 and max_len == self.max_len:
            self.has_padding = not bool(self.valid[:, :length].all())
            return
        max_len -= start
        k = self.k.new_zeros(self.k.shape[:3] + (max_len,) + self.k.shape[4:])
        v = torch.zeros_like(k)
        valid = torch.ones(self.valid.shape[0], max_len, dtype=torch.bool, device=self.valid.device)
        k[:, :, :, :length - start] = self.k[:, :, :, start:length]
        v[:, :, :, :length - start] = self.v[:, :, :, start:length]
        valid[:, :length - start] = self.valid[:, start:length]
        self.k, self.v, self.valid = k, v, valid
        self.length, self.max_len = length - start, max_len
        self.has_padding = not bool(self.valid[:, :self.length].all())


class _StepCache:
    """decode_step's cache: a layer's attention reads the preallocated k, v [L, B, H, S, D] where `mask`
    [B, 1, 1, S] allows, plus the step's own key and value, which it keeps in new_k, new_v instead of writing
    them into the cache: under torch.compile an in-place write into a view of an input copies the whole cache
    every step (measured: 0.4-1.4 ms a layer at batch 16), so decode_step writes them after the step."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> None:
        self.k, self.v, self.mask = k, v, mask
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.new_k.append(k)
        self.new_v.append(v)
        return one_query_attention(q, self.k[layer], self.v[layer], self.mask, k, v)


# ---- blocks -------------------------------------------------------------------------------------


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for one query per row (decoding): q [B, H, 1, D], k, v [B, KV, S, D]
    (H a multiple of KV), mask [B, 1, 1, S] (True: may attend) or None; k_new, v_new [B, KV, 1, D]: one more
    key and value after those, always attended (the step's own, not yet in the cache). Two small matmuls in
    fp32 (fp64 for fp64 inputs): in a compiled decode step on a CPU they took less than half the time of
    SDPA's flash kernel, whose blocking is made for many queries (b1 minimind2-small, 256 cached positions:
    1.25x tokens/s overall), and fp32 scores keep greedy decoding on SDPA's tokens (bf16 scores did not). A row
    with every key masked (an idle serving slot) gets zeros, as SDPA gives."""
    B, H, _, D = q.shape
    kv, dtype = k.shape[1], q.dtype
    acc = torch.promote_types(dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q = q.to(acc).view(B, kv, H // kv, D) / math.sqrt(D)
        scores = q @ k.to(acc).transpose(-1, -2)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        if k_new is not None:
            scores = torch.cat([scores, (q * k_new.to(acc)).sum(-1, keepdim=True)], -1)
        p = scores.softmax(-1).nan_to_num(0.0)
        out = p[..., :k.shape[2]] @ v.to(acc)
        if v_new is not None:
            out = out + p[..., -1:] * v_new.to(acc)
    return out.view(B, H, 1, D).to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        self.qkv_proj: nn.Linear | None = None

    def fuse(self) -> None:
        """For inference: q, k and v become one projection (one matmul, one weight read per token)."""
        weights = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        w = torch.cat(weights)
        self.qkv_proj = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        self.qkv_proj.weight.data.copy_(w)
        self.split = [x.shape[0] for x in weights]
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.split, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if isinstance(cache, _StepCache):
            return self.o_proj(cache.attend(self.layer, q, k, v).transpose(1, 2).reshape(B, T, -1))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        dropout = self.dropout if self.training else 0.0
        # Without a cache every mask here is causal (plus padding or documents), as blocked_attention requires.
        if cache is None and T > 1 and not dropout and blocked_attention.usable(q):
            out = blocked_attention.causal_attention(q, k, v, mask)
        elif cache is not None and T == 1 and q.device.type == "cpu":
            out = one_query_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                                 enable_gqa=self.n_kv != self.n_heads)
        out = self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        return F.dropout(out, self.dropout, training=True) if self.training and self.dropout else out


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.gate_up_proj: nn.Linear | None = None

    def fuse(self) -> None:
        """For inference: gate and up become one projection (one matmul, one weight read per token)."""
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        self.gate_up_proj = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        self.gate_up_proj.weight.data.copy_(w)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, -1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Softmax router over `num_experts` SwiGLU experts; each token goes to its top-k, weights renormalised if
    norm_topk_prob. With shared_expert_intermediate_size, every token also goes through one shared expert,
    scaled by sigmoid(shared_expert_gate(x)), as in transformers' Qwen2-MoE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.num_experts
        self.norm_topk_prob, self.aux_coef = cfg.norm_topk_prob, cfg.router_aux_loss_coef
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        # Group tokens by expert: one matmul per expert instead of one per token.
        counts = torch.bincount(chosen.flatten(), minlength=self.n_experts).tolist()
        order = chosen.flatten().argsort(stable=True)
        token_of = order // self.top_k
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = order[start:start + n]
            tokens = token_of[start:start + n]
            start += n
            y = self.experts[e](x[tokens]) * weights.flatten()[idx, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        # Switch-style load balancing: coef * E * sum_e(fraction of assignments to e * mean router prob of e).
        load = torch.tensor(counts, dtype=torch.float32, device=x.device) / max(chosen.numel(), 1)
        aux = self.aux_coef * self.n_experts * (load * probs.mean(0)).sum()
        return out.view(shape), aux


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.use_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            h, aux = h
            return x + h, aux
        return x + h, None


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = cfg.dropout
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # next-token cross-entropy, without the aux loss
    aux_loss: torch.Tensor | None = None  # MoE load balancing, summed over layers (None for dense models)


class MiniMindForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.initializer_range)

    def fuse_projections(self) -> MiniMindForCausalLM:
        """For inference only (state-dict names change): fuse q/k/v and gate/up in every layer and expert, so
        decoding runs one matmul where it ran three and two. Same outputs up to matmul rounding. Returns self."""
        for m in self.modules():
            if isinstance(m, (Attention, MLP)):
                m.fuse()
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) tensors are counted once

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        return KVCache(self.config, batch, max_len, p.device, dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0,
                logits_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = padding) covers these T tokens only: the
        cache remembers earlier ones. labels [B, T] are the targets unshifted (-100 = no loss), as in
        transformers. logits_to_keep=N returns logits for the last N positions only (0 = all).
        logits_mask [B, T] (bool) returns logits [N, V] for the N positions where it is True, in row-major
        order: training skips the output head where there is no target (most of an SFT row's prompt).
        document_ids [B, T] (integers, equal within a document, changing where one starts) splits packed
        rows: a token attends only to its own document and positions restart at 0 at each document start,
        so each document gets the logits it would get alone. inputs_embeds [B, T, hidden] replaces the token
        embeddings (input_ids still give the shape): the vision model puts image features into them."""
        B, T = input_ids.shape
        if logits_mask is not None and (labels is not None or logits_to_keep):
            raise ValueError("logits_mask cannot be combined with labels or logits_to_keep")
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids splits whole packed rows; it cannot be combined with a KV cache")
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {past + T} requested")
        if position_ids is None and document_ids is not None:
            position_ids = document_positions(document_ids)
        elif position_ids is None:
            offset = cache.next_pos[:, None] if cache is not None else 0
            if attention_mask is None:
                position_ids = offset + torch.arange(T, device=input_ids.device)[None].expand(B, T)
            else:
                position_ids = offset + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask, is_causal = self._attention_mask(attention_mask, cache, B, T, input_ids.device, document_ids)

        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.training and self.model.dropout:
            x = F.dropout(x, self.model.dropout, training=True)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = self.model.rotary(position_ids, dtype)
        aux_total = None
        for block in self.model.layers:
            x, aux = block(x, cos, sin, mask, is_causal, cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None:
            cache.length += T
            cache.next_pos += T if attention_mask is None else attention_mask.long().sum(-1)
        if logits_mask is not None:
            x = x[logits_mask]  # before the norm too: it is per position, so only the kept ones need it
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = -token_logprobs(logits, labels).sum() / (labels[:, 1:] != -100).sum().clamp(min=1)
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_total)

    def decode_step(self, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                    pos: torch.Tensor, next_pos: torch.Tensor, step: Callable | None = None) -> torch.Tensor:
        """One decoding step whose shapes never change, so a compiled step replays for every token: tokens [B]
        go in at cache position `pos` ([1], long) and RoPE positions next_pos [B]; attention reads all of the
        preallocated cache k, v [L, B, H, S, D] under a mask (the positions before pos that `valid` [B, S]
        allows) instead of a slice that grows. Writes the new keys and values at pos and advances pos and
        next_pos; returns logits [B, V]. The same arithmetic as forward() with a KVCache (tests hold them
        equal), only no Python int depends on the position. `step`: MiniMindForCausalLM.step_logits or a
        compiled copy of it (generation.fixed_step)."""
        logits, new_k, new_v = (step or MiniMindForCausalLM.step_logits)(self, tokens, k, v, valid, pos, next_pos)
        k.index_copy_(3, pos, new_k)
        v.index_copy_(3, pos, new_v)
        pos.add_(1)
        next_pos.add_(1)
        return logits

    def step_logits(self, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                    pos: torch.Tensor, next_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """decode_step's computation, which writes nothing (what torch.compile compiles): logits [B, V] and the
        step's keys and values [L, B, H, 1, D] for decode_step to write at pos."""
        keys = torch.arange(valid.shape[1], device=valid.device)
        cache = _StepCache(k, v, (valid & (keys < pos))[:, None, None, :])
        x = self.model.embed_tokens(tokens[:, None])
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = self.model.rotary(next_pos[:, None], dtype)
        for block in self.model.layers:
            x, _ = block(x, cos, sin, None, False, cache)
        return self.lm_head(self.model.norm(x))[:, 0], torch.stack(cache.new_k), torch.stack(cache.new_v)

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None, cache: KVCache | None, B: int, T: int,
                        device: torch.device, document_ids: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor | None, bool]:
        """Pick SDPA's fastest correct form: is_causal for plain prefill, no mask for unpadded decoding,
        and an explicit boolean mask [B, 1, T, past+T] only when there is padding, a chunked prefill or
        more than one document in a row."""
        past = cache.length if cache is not None else 0
        padded = attention_mask is not None and not bool(attention_mask.all())
        if cache is not None:
            if attention_mask is not None:
                cache.valid[:, past:past + T] = attention_mask.bool()
            cache.has_padding = cache.has_padding or padded
            padded = cache.has_padding
        if not padded and document_ids is None:
            if past == 0:
                return None, T > 1
            if T == 1:
                return None, False
        S = past + T
        keys = torch.arange(S, device=device)
        queries = torch.arange(past, S, device=device)
        allowed = keys[None, :] <= queries[:, None]  # causal [T, S]
        if cache is not None:
            valid = cache.valid[:, :S]
        elif attention_mask is not None:
            valid = attention_mask.bool()
        else:
            valid = torch.ones(B, S, dtype=torch.bool, device=device)
        mask = allowed[None] & valid[:, None, :]
        if document_ids is not None:  # (no cache here, so keys and queries are the same T positions)
            mask &= document_ids[:, :, None] == document_ids[:, None, :]
        # A padding query would see no key at all (its softmax is NaN); let it see itself instead.
        mask |= keys[None, None, :] == queries[None, :, None]
        return mask[:, None], False
