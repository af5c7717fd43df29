"""Tests for the GGUF and Ollama exporters: every tensor and key read back with gguf.GGUFReader, a numpy forward
pass with llama.cpp's semantics against our logits, and the Modelfile. `pytest tests/test_export.py`."""

import argparse
import json
import math
import re

import gguf
import numpy as np
import pytest
import torch
from conftest import small_model

from minimind import MiniMindError
from minimind.chat import CHAT_TEMPLATE, TOOLS_INTRO, TOOLS_OUTRO
from minimind.checkpoint import save_model
from minimind.commands.export import add_parser as add_export_parser
from minimind.export.gguf import export_gguf, pre_tokenizer_name, read_gguf
from minimind.export.ollama import STOP_TOKENS, export_ollama, parse_modelfile

VOCAB = 416  # more rows than the 400-token test tokenizer: the GGUF vocabulary gets [PAD] entries
ARCH = {"qwen3": "qwen3", "qwen3_moe": "qwen3moe", "llama": "llama"}
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE values
# transformers names -> llama.cpp names, written out independently of the exporter's table
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
}


def read_back(path):
    """Metadata, float32 tensors and storage types, read with gguf.GGUFReader directly."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors, types = {}, {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        tensors[t.name] = np.asarray(data, np.float32).reshape([int(d) for d in reversed(t.shape)])
        types[t.name] = t.tensor_type.name
    return meta, tensors, types


def expected_tensors(model):
    """Our weights under llama.cpp's names (q/k still in our rotate-half row order)."""
    cfg, out = model.config, {}
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out["token_embd.weight"] = state["model.embed_tokens.weight"]
    out["output_norm.weight"] = state["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in LAYER_NAMES.items():
            if f"model.layers.{i}.{ours}.weight" in state:
                out[f"blk.{i}.{theirs}.weight"] = state[f"model.layers.{i}.{ours}.weight"]
        if cfg.use_moe:
            for proj, theirs in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                                 ("down_proj", "ffn_down_exps")):
                out[f"blk.{i}.{theirs}.weight"] = np.stack(
                    [state[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(cfg.num_experts)])
    return out


def adjacent_to_halves(w, heads):
    """Undo llama's q/k row order: row 2i+j of each head holds our row j*D/2 + i."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + j * d // 2 + i] = w[h * d + 2 * i + j]
    return out


def ggml_forward(meta, t, ids):
    """Logits the way llama.cpp computes them from the file: adjacent-pair RoPE for `llama`, rotate-half for
    the Qwen3 ones, softmax router with renormalised top-k, output = token_embd when output.weight is absent."""
    arch = meta["general.architecture"]

    def p(key):
        return meta[f"{arch}.{key}"]

    H, KV, D = p("attention.head_count"), p("attention.head_count_kv"), p("attention.key_length")
    eps, n = p("attention.layer_norm_rms_epsilon"), len(ids)
    theta = np.arange(n)[:, None] * p("rope.freq_base") ** (-np.arange(0, D, 2) / D)
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]

    def rope(v):
        out = np.empty_like(v)
        if arch == "llama":
            a, b = v[..., 0::2], v[..., 1::2]
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        else:
            a, b = v[..., : D // 2], v[..., D // 2:]
            out[..., : D // 2], out[..., D // 2:] = a * cos - b * sin, a * sin + b * cos
        return out

    def rms(v, w):
        return v / np.sqrt((v.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w

    def silu(v):
        return v / (1 + np.exp(-v))

    x = t["token_embd.weight"][ids].astype(np.float64)
    for i in range(p("block_count")):
        def g(name, i=i):
            return t[f"blk.{i}.{name}.weight"]

        h = rms(x, g("attn_norm"))
        q, k, v = ((h @ g(f"attn_{c}").T).reshape(n, -1, D) for c in "qkv")
        if f"blk.{i}.attn_q_norm.weight" in t:
            q, k = rms(q, g("attn_q_norm")), rms(k, g("attn_k_norm"))
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(D) + np.triu(np.full((n, n), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(n, H * D) @ g("attn_output").T
        h = rms(x, g("ffn_norm"))
        if f"blk.{i}.ffn_gate_inp.weight" in t:
            logits = h @ g("ffn_gate_inp").T
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            y = np.zeros_like(h)
            for tok in range(n):
                top = np.argsort(-probs[tok])[: p("expert_used_count")]
                w = probs[tok, top] / probs[tok, top].sum()
                for e, we in zip(top, w):
                    u = silu(g("ffn_gate_exps")[e] @ h[tok]) * (g("ffn_up_exps")[e] @ h[tok])
                    y[tok] += we * (g("ffn_down_exps")[e] @ u)
        else:
            y = (silu(h @ g("ffn_gate").T) * (h @ g("ffn_up").T)) @ g("ffn_down").T
        x = x + y
    x = rms(x, t["output_norm.weight"])
    return x @ t.get("output.weight", t["token_embd.weight"]).T


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """A saved small model of each family (with the test tokenizer), plus an untied llama."""
    root = tmp_path_factory.mktemp("export_models")
    dirs = {}
    for name, family, extra in (("qwen3", "qwen3", {}), ("qwen3_moe", "qwen3_moe", {}), ("llama", "llama", {}),
                                ("llama_untied", "llama", {"tie_word_embeddings": False})):
        model = small_model(family, vocab_size=VOCAB, **extra)
        dirs[name] = (model, save_model(model, root / name, tokenizer))
    return dirs


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe", "llama", "llama_untied"])
def test_gguf_tensors_round_trip(model_dirs, tmp_path, name, qtype):
    model, directory = model_dirs[name]
    cfg = model.config
    out = export_gguf(directory, tmp_path / "m.gguf", qtype)
    meta, tensors, types = read_back(out)
    want = expected_tensors(model)
    assert set(tensors) == set(want)  # nothing missing, nothing extra (no output.weight when tied)
    assert ("output.weight" in tensors) == (name == "llama_untied")
    for tname, expected in want.items():
        got = tensors[tname]
        if cfg.model_type == "llama" and tname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in tname else cfg.num_key_value_heads
            assert not np.array_equal(got, expected)  # permuted...
            got = adjacent_to_halves(got, heads)  # ...and exactly recoverable
        assert got.shape == expected.shape, tname
        keep_f32 = expected.ndim == 1 or "ffn_gate_inp" in tname
        if qtype == "f32" or keep_f32:
            assert types[tname] == "F32", tname
            np.testing.assert_array_equal(got, expected, err_msg=tname)
        elif qtype == "f16":
            assert types[tname] == "F16", tname
            np.testing.assert_array_equal(got, expected.astype(np.float16).astype(np.float32), err_msg=tname)
        else:
            assert types[tname] == "Q8_0", tname
            # Q8_0: blocks of 32 along a row share one scale d = max|x|/127, stored as f16: rounding errs by at
            # most d/2, plus 127 * d * 2^-11 from the f16 scale.
            blocks = expected.reshape(-1, 32)
            step = np.abs(blocks).max(-1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - blocks)
            assert (err <= step * (0.5 + 127 * 2.0**-11) + 1e-8).all(), tname
            assert err.max() > 0, tname


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe", "llama", "llama_untied"])
def test_gguf_forward_matches_our_logits(model_dirs, tmp_path, name):
    """The file, computed as llama.cpp does (incl. llama's adjacent-pair RoPE on the permuted rows), gives our
    logits; q8_0 stays close."""
    model, directory = model_dirs[name]
    ids = [1, 5, 77, 300, 12, 9, 150, 2, 33, 61]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
    meta, tensors, _ = read_back(export_gguf(directory, tmp_path / "f32.gguf", "f32"))
    np.testing.assert_allclose(ggml_forward(meta, tensors, ids), ours, atol=2e-5, rtol=1e-4)
    meta, tensors, _ = read_back(export_gguf(directory, tmp_path / "q8.gguf", "q8_0"))
    q8 = ggml_forward(meta, tensors, ids)
    assert np.abs(q8 - ours).max() < 0.05 * np.abs(ours).max()


def test_gguf_metadata_every_key(model_dirs, tmp_path, tokenizer):
    for name, (model, directory) in model_dirs.items():
        cfg = model.config
        for qtype in ("f32", "q8_0"):
            meta, _, _ = read_back(export_gguf(directory, tmp_path / f"{name}.gguf", qtype, name="mm"))
            a = ARCH[cfg.model_type]
            want = {
                "general.architecture": a, "general.name": "mm", "general.file_type": FILE_TYPE[qtype],
                "general.quantization_version": 2,
                f"{a}.vocab_size": VOCAB, f"{a}.context_length": 512, f"{a}.embedding_length": 64,
                f"{a}.block_count": 2, f"{a}.feed_forward_length": 128, f"{a}.attention.head_count": 4,
                f"{a}.attention.head_count_kv": 2, f"{a}.attention.key_length": 16,
                f"{a}.attention.value_length": 16, f"{a}.rope.dimension_count": 16,
                f"{a}.rope.freq_base": 1e6,
                f"{a}.attention.layer_norm_rms_epsilon": pytest.approx(cfg.rms_norm_eps, rel=1e-6),
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.unknown_token_id": 0,
                "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
                "tokenizer.chat_template": CHAT_TEMPLATE,
            }
            if cfg.use_moe:
                want.update({f"{a}.expert_count": 4, f"{a}.expert_used_count": 2,
                             f"{a}.expert_feed_forward_length": 96})
            lists = {k: meta.pop(k) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                               "tokenizer.ggml.merges")}
            assert meta == want, name
    # the vocabulary: our 400 tokens by id, then [PAD] rows up to the model's vocab_size
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    assert lists["tokenizer.ggml.tokens"] == [vocab[i] for i in range(400)] + [f"[PAD{i}]" for i in range(400, VOCAB)]
    assert lists["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = lists["tokenizer.ggml.token_type"]
    # 1 normal, 3 control, 4 user-defined (matched in plain text, like transformers' added tokens), 5 unused
    assert types[:21] == [3] * 21  # the special ones
    assert types[21:27] == [4] * 6  # <tool_call> </tool_call> <tool_response> </tool_response> <think> </think>
    assert types[27:36] == [3] * 9  # <|buffer1..9|> look special to llama.cpp
    assert types[36:400] == [1] * 364 and types[400:] == [5] * (VOCAB - 400)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert lists["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert len(merges) == 400 - 36 - 256


def test_yarn_keys_make_llamacpp_scale_match(tokenizer, tmp_path):
    factor = 4.0
    for ours, expected in ((None, 1.0), (1.0, 1.0 / (1 + 0.1 * math.log(factor)))):
        model = small_model("qwen3", vocab_size=VOCAB, rope_scaling="yarn", yarn_factor=factor,
                            yarn_original_max_position_embeddings=128, yarn_attention_factor=ours)
        d = save_model(model, tmp_path / f"yarn{ours}", tokenizer)
        meta, _, _ = read_gguf(export_gguf(d, tmp_path / "y.gguf", "f32"))
        assert meta["qwen3.rope.scaling.type"] == "yarn"
        assert meta["qwen3.rope.scaling.factor"] == factor
        assert meta["qwen3.rope.scaling.original_context_length"] == 128
        assert meta["qwen3.rope.scaling.yarn_beta_fast"] == 32.0 and meta["qwen3.rope.scaling.yarn_beta_slow"] == 1.0
        # llama.cpp multiplies cos/sin by (1 + 0.1 ln factor) itself, then by this key: the product is ours
        total = meta["qwen3.rope.scaling.attn_factor"] * (1 + 0.1 * math.log(factor))
        assert total == pytest.approx(model.model.rotary.scale, rel=1e-6)
        assert meta["qwen3.rope.scaling.attn_factor"] == pytest.approx(expected, rel=1e-6)


def test_q8_0_falls_back_to_f16_for_rows_not_in_32_blocks(tokenizer, tmp_path):
    model = small_model("qwen3", vocab_size=VOCAB, hidden_size=48, head_dim=12, intermediate_size=96)
    d = save_model(model, tmp_path / "odd", tokenizer)
    _, tensors, types = read_back(export_gguf(d, tmp_path / "odd.gguf", "q8_0"))
    assert types["blk.0.attn_q.weight"] == "F16"  # rows of 48
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96
    np.testing.assert_array_equal(tensors["token_embd.weight"],
                                  model.model.embed_tokens.weight.detach().numpy().astype(np.float16))


def test_export_errors(model_dirs, tokenizer, tmp_path):
    _, directory = model_dirs["qwen3"]
    with pytest.raises(MiniMindError, match="--type"):
        export_gguf(directory, tmp_path / "x.gguf", "q4_0")
    with pytest.raises(MiniMindError, match="model directory not found"):
        export_gguf(tmp_path / "nope", tmp_path / "x.gguf")
    small = save_model(small_model("qwen3", vocab_size=320), tmp_path / "small", tokenizer)
    with pytest.raises(MiniMindError, match="vocab_size is 320"):
        export_gguf(small, tmp_path / "x.gguf")
    moe = save_model(small_model("qwen3_moe", vocab_size=VOCAB, norm_topk_prob=False), tmp_path / "moe", tokenizer)
    with pytest.raises(MiniMindError, match="norm_topk_prob"):
        export_gguf(moe, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()  # nothing half-written
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(MiniMindError, match="bad.gguf: not a readable GGUF"):
        read_gguf(tmp_path / "bad.gguf")
    gpt2 = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True}}
    assert pre_tokenizer_name(gpt2) == "gpt-2"  # MiniMind's original tokenizer
    with pytest.raises(MiniMindError, match="not one llama.cpp knows"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_ollama_export(model_dirs, tmp_path):
    _, directory = model_dirs["qwen3"]
    gguf_path, modelfile, command = export_ollama(directory, tmp_path / "ollama", "q8_0", name="MiniTest")
    assert command == f"ollama create minitest -f {modelfile}"
    parsed = parse_modelfile(modelfile.read_text())
    assert parsed["from"] == f"./{gguf_path.name}" and (modelfile.parent / gguf_path.name).is_file()
    meta, _, types = read_gguf(gguf_path)
    assert meta["general.name"] == "MiniTest" and "Q8_0" in types.values()
    vocab = meta["tokenizer.ggml.tokens"]
    assert parsed["stop"] == list(STOP_TOKENS) and all(s in vocab for s in parsed["stop"])
    gen = json.loads((directory / "generation_config.json").read_text())
    assert parsed["parameters"] == {"temperature": gen["temperature"], "top_p": gen["top_p"], "top_k": gen["top_k"],
                                    "repeat_penalty": 1.0, "num_ctx": 512, "num_predict": gen["max_new_tokens"]}
    t = parsed["template"]
    for piece in (TOOLS_INTRO, TOOLS_OUTRO, "{{ .Thinking }}", "<tool_response>", "{{ if $.Think }}<think>\n",
                  "<think>\n\n</think>\n\n", "{{ json .Function.Arguments }}"):
        assert piece in t, piece
    opened = t.count("{{ if ") + t.count("{{ range ")
    assert opened == t.count("{{ end }}") and t.count("{{") == t.count("}}")


def test_cli_export_gguf(model_dirs, tmp_path, capsys):
    _, directory = model_dirs["llama"]
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "gguf", "--model", str(directory), "--out", str(tmp_path / "c.gguf"),
                              "--type", "f16"])
    args.func(args)
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'c.gguf'}: llama, 20 tensors (F16, F32), {VOCAB} tokens" in out
    args = parser.parse_args(["export", "ollama", "--model", str(directory), "--out", str(tmp_path / "o")])
    args.func(args)
    assert "ollama create llama -f" in capsys.readouterr().out



def test_a_vision_model_exports_its_decoder_and_says_so(model_dirs, tokenizer, tmp_path, capsys):
    from minimind.vision.config import tiny_encoder
    from minimind.vision.model import VisionLanguageModel

    llm, _ = model_dirs["qwen3"]
    save_model(VisionLanguageModel.from_llm(llm, tiny_encoder(hidden_size=32, heads=2)), tmp_path / "v", tokenizer)
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "gguf", "--model", str(tmp_path / "v"), "--out", str(tmp_path / "v.gguf"),
                              "--type", "f32"])
    args.func(args)
    assert "decoder alone" in capsys.readouterr().out
    _, tensors, _ = read_back(tmp_path / "v.gguf")
    want = expected_tensors(llm)
    assert set(tensors) == set(want)  # the tower and projector are left out
    assert all(np.array_equal(tensors[name], want[name]) for name in want)

# ---- a small interpreter for the subset of Go's text/template the Modelfile uses, to check its output --------

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+')


def _go_truth(v):
    return bool(v)  # Go: false, 0, "", nil and empty slices/maps are false, as in Python


class _Evaluated:
    def __init__(self, value):
        self.value = value


def _go_json(v):
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)  # Go's json.Marshal: no spaces


class GoTemplate:
    """Text, {{ if / else if / else / end }}, {{ range [$i, $v :=] X }}, {{ $x := P }}, {{ $x = P }} and
    pipelines of eq ne not and or len slice index json over .Field / $var.Field / literals."""

    FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not _go_truth(a),
             "len": len, "slice": lambda x, i: x[i:], "index": lambda x, i: x[i], "json": _go_json}

    def __init__(self, text):
        self.parts, pos = [], 0
        for m in _ACTION.finditer(text):
            self.parts += [("text", text[pos:m.start()]), ("action", m.group(1).strip())]
            pos = m.end()
        self.parts.append(("text", text[pos:]))

    def render(self, data):
        out, self.data = [], data
        self._block(0, data, [{"$": data}], out, run=True)
        return "".join(out)

    def _block(self, i, dot, scopes, out, run):
        """Execute parts from i until a matching else/end; return (index of that part, its action)."""
        while i < len(self.parts):
            kind, body = self.parts[i]
            if kind == "text":
                out.append(body if run else "")
                i += 1
                continue
            head = body.split(None, 1)[0]
            if head in ("end", "else"):
                return i, body
            if head == "if":
                i = self._if(i, dot, scopes, out, run)
            elif head == "range":
                i = self._range(i, dot, scopes, out, run)
            else:
                if run:
                    m = re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", body)
                    if m:
                        value = self._pipe(m.group(3), dot, scopes)
                        target = scopes[-1] if m.group(2) == ":=" else next(
                            s for s in reversed(scopes) if m.group(1) in s)
                        target[m.group(1)] = value
                    else:
                        out.append(str(self._pipe(body, dot, scopes)))
                i += 1
        return i, None

    def _if(self, i, dot, scopes, out, run):
        cond = run and _go_truth(self._pipe(self.parts[i][1][2:], dot, scopes))
        taken = False
        while True:
            i, stop = self._block(i + 1, dot, scopes + [{}], out, run and cond and not taken)
            taken = taken or cond
            if stop == "end":
                return i + 1
            if stop.startswith("else if"):
                cond = run and not taken and _go_truth(self._pipe(stop[7:], dot, scopes))
            else:  # plain else
                cond = run and not taken

    def _range(self, i, dot, scopes, out, run):
        m = re.fullmatch(r"range\s+(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.+)", self.parts[i][1], re.S)
        items = list(enumerate(self._pipe(m.group(3), dot, scopes) or [])) if run else []
        end = None
        for k, item in items:
            scope = {m.group(1): k, m.group(2): item} if m.group(1) else {}
            end, _ = self._block(i + 1, item, scopes + [scope], out, run=True)
        if end is None:
            end, _ = self._block(i + 1, dot, scopes + [{}], out, run=False)
        return end + 1

    def _pipe(self, text, dot, scopes):
        tokens = _TOKEN.findall(text)
        value, rest = self._command(tokens, dot, scopes)
        assert not rest, text
        return value

    def _command(self, tokens, dot, scopes):
        args = []
        while tokens and tokens[0] != ")":
            tok, tokens = tokens[0], tokens[1:]
            if tok == "(":
                value, tokens = self._command(tokens, dot, scopes)
                tokens = tokens[1:]  # the ")"
                if tokens and tokens[0].startswith("."):  # (index $rest 1).Role
                    value = self._fields(value, tokens[0])
                    tokens = tokens[1:]
                args.append(_Evaluated(value))
            else:
                args.append(tok)
        if args and isinstance(args[0], str) and args[0] in (*self.FUNCS, "and", "or"):
            name, vals = args[0], [self._operand(a, dot, scopes) for a in args[1:]]
            if name in ("and", "or"):
                for v in vals:
                    if _go_truth(v) != (name == "and"):
                        return v, tokens
                return vals[-1], tokens
            return self.FUNCS[name](*vals), tokens
        assert len(args) == 1, args
        return self._operand(args[0], dot, scopes), tokens

    def _operand(self, tok, dot, scopes):
        if isinstance(tok, _Evaluated):
            return tok.value  # a sub-pipeline's result, not a token
        if tok.startswith('"'):
            return json.loads(tok)
        if tok.isdigit():
            return int(tok)
        if tok.startswith("$"):
            name, _, path = tok.partition(".")
            value = next(s[name] for s in reversed(scopes) if name in s)
        else:
            value, path = dot, tok
        return self._fields(value, path)

    @staticmethod
    def _fields(value, path):
        for field in filter(None, path.split(".")):
            value = value.get(field) if isinstance(value, dict) else None
        return value


def ollama_data(messages, tools=None, think=False):
    """What Ollama passes the template: system messages joined as .System, messages with Go field names."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    msgs = []
    for m in messages:
        calls = [{"Function": {"Name": c["function"]["name"], "Arguments": c["function"]["arguments"]}}
                 for c in m.get("tool_calls", [])]
        msgs.append({"Role": m["role"], "Content": m["content"], "Thinking": m.get("reasoning_content", ""),
                     "ToolCalls": calls})
    return {"System": system, "Messages": msgs, "Tools": tools, "Think": think, "IsThinkSet": think}


def test_ollama_template_renders_our_chat_format():
    from minimind.chat import render
    from minimind.export.ollama import TEMPLATE

    tool = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic",
                                             "parameters": {"type": "object",
                                                            "properties": {"expr": {"type": "string"}}}}}
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expr": "12*3"}}}
    cases = [
        ([{"role": "user", "content": "Hi"}], None, False),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], None, True),
        ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"},
          {"role": "user", "content": "你好"}], None, False),
        ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "12*3?"},
          {"role": "assistant", "content": "", "tool_calls": [call, call]},
          {"role": "tool", "content": "36"}, {"role": "tool", "content": "36"}], [tool], True),
        ([{"role": "user", "content": "12*3?"}, {"role": "assistant", "content": "Let me see.", "tool_calls": [call]},
          {"role": "tool", "content": "36"}, {"role": "assistant", "content": "36"},
          {"role": "user", "content": "thanks"}], [tool], False),
    ]
    template = GoTemplate(TEMPLATE)
    for messages, tools, think in cases:
        want = render(messages, tools=tools, add_generation_prompt=True, enable_thinking=think)
        # Go writes JSON without spaces: the one difference Ollama's template language forces on us
        for obj in [tool, call["function"]["arguments"]] if tools else []:
            want = want.replace(json.dumps(obj, ensure_ascii=False), _go_json(obj))
        assert template.render(ollama_data(messages, tools, think)) == want, messages
