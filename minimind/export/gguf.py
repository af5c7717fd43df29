"""GGUF export for llama.cpp: weights under llama.cpp's tensor names, the model's hyper-parameters, the byte-level BPE
tokenizer and the chat template, written with the `gguf` package. `minimind export gguf --model DIR --out m.gguf`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from minimind import MiniMindError
from minimind.chat import CHAT_TEMPLATE
from minimind.config import ModelConfig

GGUF_TYPES = ("f32", "f16", "q8_0")
# llama.cpp's architecture for each of our model families. `llama` rotates interleaved pairs (GPT-J style),
# the Qwen3 ones rotate halves (NeoX style) as we do, so only `llama` needs its q/k rows reordered.
ARCHITECTURES = {"qwen3": gguf.MODEL_ARCH.QWEN3, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "llama": gguf.MODEL_ARCH.LLAMA}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
QUANT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
               "q8_0": gguf.GGMLQuantizationType.Q8_0}
# What llama.cpp reads for a YaRN model of these architectures; other beta values would be silently ignored.
LLAMACPP_YARN_BETAS = (32.0, 1.0)

# Our (transformers) per-layer weight names -> llama.cpp tensor kinds.
_LAYER_TENSORS = {
    "input_layernorm": gguf.MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "self_attn.q_norm": gguf.MODEL_TENSOR.ATTN_Q_NORM,
    "self_attn.k_norm": gguf.MODEL_TENSOR.ATTN_K_NORM,
    "post_attention_layernorm": gguf.MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": gguf.MODEL_TENSOR.FFN_DOWN,
    "mlp.gate": gguf.MODEL_TENSOR.FFN_GATE_INP,
}
_EXPERT_TENSORS = {"gate_proj": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up_proj": gguf.MODEL_TENSOR.FFN_UP_EXP,
                   "down_proj": gguf.MODEL_TENSOR.FFN_DOWN_EXP}


def tensor_name(kind: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight"


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's q/k output rows from rotate-half pairs (i, i + D/2) to adjacent pairs (2i, 2i + 1),
    the layout llama.cpp's `llama` architecture rotates. The attention scores are unchanged."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our float weights as float32 arrays under llama.cpp's names: experts stacked into one [E, out, in] tensor
    per projection, q/k permuted for `llama`, and no `output.weight` when embeddings are tied (llama.cpp then
    reuses `token_embd` for all three architectures)."""
    arch = ARCHITECTURES[cfg.model_type]

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise MiniMindError(f"weights lack {name}")
        return state[name].detach().to("cpu", torch.float32).numpy()

    out = {tensor_name(gguf.MODEL_TENSOR.TOKEN_EMBD): get("model.embed_tokens.weight")}
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for ours, kind in _LAYER_TENSORS.items():
            if prefix + ours + ".weight" in state:
                w = get(prefix + ours + ".weight")
                if arch == gguf.MODEL_ARCH.LLAMA and ours == "self_attn.q_proj":
                    w = permute_rope(w, cfg.num_attention_heads)
                elif arch == gguf.MODEL_ARCH.LLAMA and ours == "self_attn.k_proj":
                    w = permute_rope(w, cfg.num_key_value_heads)
                out[tensor_name(kind, i)] = w
        if cfg.use_moe:
            for proj, kind in _EXPERT_TENSORS.items():
                out[tensor_name(kind, i)] = np.stack(
                    [get(f"{prefix}mlp.experts.{e}.{proj}.weight") for e in range(cfg.num_experts)])
    out[tensor_name(gguf.MODEL_TENSOR.OUTPUT_NORM)] = get("model.norm.weight")
    if not cfg.tie_word_embeddings:
        out[tensor_name(gguf.MODEL_TENSOR.OUTPUT)] = get("lm_head.weight")
    # A name llama.cpp does not list for this architecture would be ignored or fatal there.
    allowed = {gguf.TENSOR_NAMES[k].format(bid=i) + ".weight" for k in gguf.MODEL_TENSORS[arch]
               for i in range(cfg.num_hidden_layers)}
    assert set(out) <= allowed, sorted(set(out) - allowed)
    return out


def storage_type(name: str, array: np.ndarray, qtype: str) -> gguf.GGMLQuantizationType:
    """What llama.cpp's converter stores: norms, other 1-D tensors and the MoE router in F32, the rest in `qtype`."""
    if array.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return gguf.GGMLQuantizationType.F32
    return QUANT_TYPES[qtype]


def encode_tensor(array: np.ndarray, kind: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Convert or quantise one tensor; rows that do not split into 32-value Q8_0 blocks fall back to F16."""
    if kind == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32), kind
    if kind == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16), kind
    try:
        return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), kind), kind
    except gguf.QuantError:
        return np.ascontiguousarray(array, dtype=np.float16), gguf.GGMLQuantizationType.F16


# ---- tokenizer -------------------------------------------------------------------------------------------


def pre_tokenizer_name(tokenizer_json: dict[str, Any], source: str = "tokenizer.json") -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization: ours splits with Qwen2's regex (`qwen2`); MiniMind's
    original uses the byte-level GPT-2 regex (`gpt-2`). llama.cpp has no way to run any other regex."""
    from minimind.tokenizer import GGUF_PRE_TOKENIZER, QWEN2_SPLIT_REGEX

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT_REGEX \
            and not steps[1].get("use_regex", True):
        return GGUF_PRE_TOKENIZER
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space", False):
        return "gpt-2"
    raise MiniMindError(f"{source}: pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp knows "
                        "(expected Qwen2's split regex or byte-level GPT-2)")


def _looks_control(token: str) -> bool:
    # llama.cpp's converter treats <|...|> as control tokens even when not flagged special.
    return token.startswith("<|") and token.endswith("|>")


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Vocabulary (padded to the model's vocab_size), token types, merges, special ids and chat template."""
    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    if (tok_json.get("model") or {}).get("type") != "BPE":
        raise MiniMindError("tokenizer.json: only byte-level BPE tokenizers can be exported to GGUF")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise MiniMindError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                            f"{vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # rows the model has but the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        token = by_id[i]
        tokens.append(token)
        if i in added:
            # Control tokens are only matched in text when asked to parse specials; user-defined ones (our
            # <think>/<tool_call> tags) always are, as transformers does for every added token.
            control = added[i].special or _looks_control(token)
            types.append(int(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else CHAT_TEMPLATE
    K = gguf.Keys.Tokenizer
    meta: dict[str, Any] = {
        K.MODEL: "gpt2",
        K.PRE: pre_tokenizer_name(tok_json),
        K.LIST: tokens,
        K.TOKEN_TYPE: types,
        K.MERGES: merges,
    }
    for key, token in ((K.BOS_ID, tokenizer.bos_token), (K.EOS_ID, tokenizer.eos_token),
                       (K.PAD_ID, tokenizer.pad_token), (K.UNK_ID, tokenizer.unk_token)):
        if token is not None and token in vocab:
            meta[key] = vocab[token]
    meta[K.ADD_BOS] = False  # our prompts carry their own <|im_start|>; nothing is prepended
    meta[K.ADD_EOS] = False
    meta[K.CHAT_TEMPLATE] = template
    return meta


# ---- hyper-parameters ------------------------------------------------------------------------------------


def model_metadata(cfg: ModelConfig, qtype: str, name: str) -> dict[str, Any]:
    """general.* and <arch>.* keys as llama.cpp reads them for this model."""
    if cfg.model_type not in ARCHITECTURES:
        # llama.cpp's qwen2moe does not renormalise the top-k weights (MiniMind2's MoE does, with k = 2), so
        # its output would differ; a mapping that could be checked against llama.cpp is future work.
        raise MiniMindError(f"config.json: model_type {cfg.model_type} (an MoE with a shared expert, e.g. MiniMind2's) "
                            f"cannot be exported to GGUF yet; {', '.join(ARCHITECTURES)} can")
    arch = gguf.MODEL_ARCH_NAMES[ARCHITECTURES[cfg.model_type]]
    if cfg.use_moe and not cfg.norm_topk_prob:
        raise MiniMindError("config.json: norm_topk_prob = false cannot be exported: llama.cpp's qwen3moe always "
                            "renormalises the top-k expert weights")
    K, A = gguf.Keys, {}

    def key(template: str) -> str:
        return template.format(arch=arch)

    A["general.name"] = name
    A[K.General.FILE_TYPE] = int(FILE_TYPES[qtype])
    A[K.General.QUANTIZATION_VERSION] = gguf.GGML_QUANT_VERSION
    A[key(K.LLM.VOCAB_SIZE)] = cfg.vocab_size
    A[key(K.LLM.CONTEXT_LENGTH)] = cfg.max_position_embeddings
    A[key(K.LLM.EMBEDDING_LENGTH)] = cfg.hidden_size
    A[key(K.LLM.BLOCK_COUNT)] = cfg.num_hidden_layers
    A[key(K.LLM.FEED_FORWARD_LENGTH)] = cfg.intermediate_size
    A[key(K.Attention.HEAD_COUNT)] = cfg.num_attention_heads
    A[key(K.Attention.HEAD_COUNT_KV)] = cfg.num_key_value_heads
    A[key(K.Attention.KEY_LENGTH)] = cfg.head_dim
    A[key(K.Attention.VALUE_LENGTH)] = cfg.head_dim
    A[key(K.Attention.LAYERNORM_RMS_EPS)] = float(cfg.rms_norm_eps)
    A[key(K.Rope.DIMENSION_COUNT)] = cfg.head_dim
    A[key(K.Rope.FREQ_BASE)] = float(cfg.rope_theta)
    if cfg.use_moe:
        A[key(K.LLM.EXPERT_COUNT)] = cfg.num_experts
        A[key(K.LLM.EXPERT_USED_COUNT)] = cfg.num_experts_per_tok
        A[key(K.LLM.EXPERT_FEED_FORWARD_LENGTH)] = cfg.moe_intermediate_size
    if cfg.rope_scaling == "yarn":
        if (cfg.yarn_beta_fast, cfg.yarn_beta_slow) != LLAMACPP_YARN_BETAS:
            raise MiniMindError(f"config.json: YaRN beta_fast/beta_slow {cfg.yarn_beta_fast}/{cfg.yarn_beta_slow} "
                                f"cannot be exported: llama.cpp's {arch} always uses 32/1")
        factor = float(cfg.yarn_factor)
        ours = cfg.yarn_attention_factor
        if ours is None:
            ours = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        A[key(K.Rope.SCALING_TYPE)] = gguf.RopeScalingType.YARN.value
        A[key(K.Rope.SCALING_FACTOR)] = factor
        A[key(K.Rope.SCALING_ORIG_CTX_LEN)] = cfg.yarn_original_max_position_embeddings
        # llama.cpp scales cos/sin by (1 + 0.1 ln factor) by itself and then by this key: store the ratio so
        # the product is our attention factor.
        A[key(K.Rope.SCALING_ATTN_FACTOR)] = float(ours) / (1.0 + 0.1 * math.log(factor))
        A[key(K.Rope.SCALING_YARN_BETA_FAST)] = float(cfg.yarn_beta_fast)
        A[key(K.Rope.SCALING_YARN_BETA_SLOW)] = float(cfg.yarn_beta_slow)
    return A


def _value_type(key: str, value: Any) -> tuple[gguf.GGUFValueType, gguf.GGUFValueType | None]:
    simple = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32,
              str: gguf.GGUFValueType.STRING}
    if isinstance(value, list):
        item = simple[type(value[0])] if value else gguf.GGUFValueType.STRING
        # token types are signed in llama.cpp's files
        return gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32 if item == gguf.GGUFValueType.UINT32 else item
    if type(value) not in simple:
        raise TypeError(f"{key}: unsupported metadata value {value!r}")
    return simple[type(value)], None


# ---- writing and reading ---------------------------------------------------------------------------------


def write_gguf(model: torch.nn.Module, tokenizer: Any, out: str | Path, qtype: str = "f16",
               name: str = "minimind") -> Path:
    """Write `model` (a MiniMindForCausalLM) and its tokenizer to one GGUF file, atomically."""
    from minimind.files import atomic_path

    if qtype not in GGUF_TYPES:
        raise MiniMindError(f"--type must be one of {', '.join(GGUF_TYPES)}, not {qtype!r}")
    cfg: ModelConfig = model.config
    meta = {**model_metadata(cfg, qtype, name), **tokenizer_metadata(tokenizer, cfg.vocab_size)}
    tensors = gguf_tensors(model.state_dict(), cfg)
    arch = gguf.MODEL_ARCH_NAMES[ARCHITECTURES[cfg.model_type]]
    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, value in meta.items():
            vtype, sub = _value_type(key, value)
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for tname, array in tensors.items():
            data, kind = encode_tensor(array, storage_type(tname, array, qtype))
            writer.add_tensor(tname, data, raw_dtype=kind if kind == gguf.GGMLQuantizationType.Q8_0 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def export_gguf(model_dir: str | Path, out: str | Path, qtype: str = "f16", name: str | None = None) -> Path:
    """Load a model directory (weights + tokenizer) and write it as GGUF for llama.cpp."""
    from minimind.checkpoint import load_model
    from minimind.tokenizer import load_tokenizer

    if qtype not in GGUF_TYPES:
        raise MiniMindError(f"--type must be one of {', '.join(GGUF_TYPES)}, not {qtype!r}")
    model = load_model(model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(model_dir)
    return write_gguf(model, tokenizer, out, qtype, name or default_name(model_dir))


def default_name(model_dir: str | Path) -> str:
    """The model directory's name, or its run's name for a run's `model/` directory (runs/demo/sft/model -> sft)."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """Read a GGUF file back: (metadata, float32 tensors in numpy [out, in] order, storage type per tensor)."""
    path = Path(path)
    if not path.is_file():
        raise MiniMindError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise MiniMindError(f"{path}: not a readable GGUF file ({e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors, types = {}, {}
    for t in reader.tensors:
        kind = gguf.GGMLQuantizationType(t.tensor_type)
        data = gguf.quants.dequantize(np.asarray(t.data), kind)
        tensors[t.name] = np.asarray(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        types[t.name] = kind.name
    return meta, tensors, types
