"""MiniMind2-era models: their tokenizer (no think or tool tags) and chat format, their MoE with shared experts.
Side by side with MiniMind's own code at c090b69 on the same random weights. `pytest tests/test_minimind2.py`.

The comparisons (marked `upstream`, outside the default suite: `pytest -m upstream tests/test_minimind2.py`) need
MiniMind's repository (its model code, tokenizer and template at c090b69, read with git): $MINIMIND_REPO, else
the mirror this project was built beside. The tests of our own behaviour need neither and run by default."""

import argparse
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import small_model
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from test_chat import CONVERSATIONS
from test_export import GoTemplate, ollama_data
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

from minimind import MiniMindError
from minimind.chat import CHAT_TEMPLATES, chat_format, encode_chat, render
from minimind.checkpoint import load_model, save_model
from minimind.cli import main
from minimind.commands.export import add_import_parser
from minimind.export.gguf import export_gguf, read_gguf
from minimind.export.ollama import export_ollama, go_template, parse_modelfile
from minimind.generation import SamplingParams, generate
from minimind.importer import import_model
from minimind.serve.api import create_app
from minimind.tokenizer import load_tokenizer

UPSTREAM_COMMIT = "c090b69"  # MiniMind's last commit with the minimind2 tokenizer (101d7df replaced it)
REPO = Path(os.environ.get("MINIMIND_REPO", "/work/.mirror/jingyaogong+minimind/repo"))
PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# ------------------------------------------------------------------ MiniMind's own code, side by side


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """MiniMind's model module and its model/ folder (tokenizer.json, tokenizer_config.json) at c090b69."""
    if not (REPO / "HEAD").is_file() and not (REPO / ".git").exists():
        pytest.skip(f"MiniMind's repository is not at {REPO} (set MINIMIND_REPO): nothing to compare against")
    folder = tmp_path_factory.mktemp("minimind_c090b69") / "model"
    folder.mkdir()
    for name in ("model_minimind.py", "tokenizer.json", "tokenizer_config.json"):
        blob = subprocess.run(["git", "-C", str(REPO), "show", f"{UPSTREAM_COMMIT}:model/{name}"],
                              capture_output=True, check=True).stdout
        (folder / name).write_bytes(blob)
    spec = importlib.util.spec_from_file_location("minimind_upstream_c090b69", folder / "model_minimind.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, folder


SHAPES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512)
UPSTREAM_CONFIGS = {
    "dense": dict(SHAPES),  # minimind2-small / minimind2, small
    "moe": dict(SHAPES, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1),  # MiniMind2-MoE
    "moe-2-shared": dict(SHAPES, use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2),
}


def upstream_model(module, fields: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = module.MiniMindForCausalLM(module.MiniMindConfig(**fields))
    with torch.no_grad():  # random norm weights too, so a norm in the wrong place cannot hide behind 1.0
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def import_pth(theirs, tok_dir: Path, tmp_path: Path, capsys) -> Path:
    """`minimind import` of the state dict as MiniMind's trainers save it (every key, lm_head too)."""
    pth = tmp_path / "full_sft_64.pth"
    torch.save({k: v.detach().clone() for k, v in theirs.state_dict().items()}, pth)
    parser = argparse.ArgumentParser()
    add_import_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "imported"
    args = parser.parse_args(["import", str(pth), "--out", str(out), "--tokenizer", str(tok_dir),
                              "--num-attention-heads", "4", "--num-key-value-heads", "2",
                              "--max-position-embeddings", "512"])
    args.func(args)
    capsys.readouterr()
    return out


@pytest.mark.upstream
@pytest.mark.parametrize("kind", list(UPSTREAM_CONFIGS))
def test_minimind2_weights_import_and_match_minimind(kind, upstream, tmp_path, capsys):
    module, folder = upstream
    theirs = upstream_model(module, UPSTREAM_CONFIGS[kind])
    out = import_pth(theirs, folder, tmp_path, capsys)
    ours = load_model(out)
    assert ours.config.model_type == ("llama" if kind == "dense" else "qwen2_moe")
    # The directory carries MiniMind2's own tokenizer and template.
    assert (out / "tokenizer.json").read_bytes() != b""
    tok = load_tokenizer(out)
    assert chat_format(tok) == "minimind2"
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(folder).get_vocab()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == \
        json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 6400, (2, 24), generator=g)
    with torch.no_grad():
        want = theirs(ids).logits
        assert (ours(ids).logits - want).abs().max().item() <= 1e-5
        # transformers reads the directory as the model type it names, with the same logits
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(hf).__name__ == ("LlamaForCausalLM" if kind == "dense" else "Qwen2MoeForCausalLM")
        assert (hf(ids).logits - want).abs().max().item() <= 1e-5
    if kind == "moe":  # MiniMind's custom-code directory (`model_type: minimind`) of the same weights
        src = tmp_path / "custom"
        src.mkdir()
        (src / "config.json").write_text(theirs.config.to_json_string())
        save_file({k: v.contiguous() for k, v in theirs.state_dict().items() if k != "lm_head.weight"},
                  src / "model.safetensors")
        again = load_model(import_model(src, tmp_path / "from_custom", tokenizer=folder))
        assert again.config.model_type == "qwen2_moe" and again.config.router_aux_loss_coef == 0.01
        with torch.no_grad():
            assert (again(ids).logits - want).abs().max().item() <= 1e-5
    if kind == "dense":  # GGUF keeps MiniMind2's vocabulary, its GPT-2 pre-tokenizer and its template
        meta, _, _ = read_gguf(export_gguf(out, tmp_path / "m.gguf", "f32"))
        assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.tokens"][:6400] == [
            t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
        assert meta["tokenizer.chat_template"] == tok.chat_template


GREEDY_TOKENS = 16
MESSAGES = [
    [{"role": "user", "content": "你有什么特长？"}],
    [{"role": "system", "content": "You are MiniMind."}, {"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Rayleigh scattering."}, {"role": "user", "content": "解释一下"}],
]


def upstream_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with MiniMind's forward and its own KV cache (its `generate` relies on transformers 4.x:
    under 5.x it drops the cache yet is fed only the new token), up to <|im_end|> (id 2)."""
    out, past, step = [], None, torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            result = model(step, past_key_values=past, use_cache=True)
            past, token = result.past_key_values, int(result.logits[0, -1].argmax())
            if token == 2:
                break
            out.append(token)
            step = torch.tensor([[token]])
    return out


@pytest.mark.upstream
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_chat_and_serve_give_minimind_greedy_tokens(kind, upstream, tmp_path, capsys):
    """The prompt MiniMind's template makes, the greedy tokens of its model code and their text: the same from
    our generation and from our server."""
    module, folder = upstream
    theirs = upstream_model(module, UPSTREAM_CONFIGS[kind], seed=1)
    their_tok = AutoTokenizer.from_pretrained(folder)
    out = import_pth(theirs, folder, tmp_path, capsys)
    ours, tok = load_model(out), load_tokenizer(out)
    app = create_app(ours, tok)
    with TestClient(app) as client:
        for messages in MESSAGES:
            prompt = their_tok(their_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]
            assert encode_chat(tok, messages, add_generation_prompt=True)[0] == prompt
            their_ids = upstream_greedy(theirs, prompt, GREEDY_TOKENS)
            their_text = their_tok.decode(their_ids, skip_special_tokens=True)
            assert len(their_ids) > 4 and their_text.strip()  # a real comparison, not two empty answers

            (done,) = generate(ours, tok, [prompt], SamplingParams(temperature=0, max_new_tokens=GREEDY_TOKENS))
            assert done.token_ids == their_ids
            assert done.text == their_text

            r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "temperature": 0,
                                                          "max_tokens": GREEDY_TOKENS})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["prompt_tokens"] == len(prompt)
            assert body["usage"]["completion_tokens"] == len(their_ids)
            # the API trims the whitespace around an answer, as the chat template writes it
            assert body["choices"][0]["message"]["content"] == their_text.strip()


@pytest.mark.upstream
def test_minimind2_format_renders_as_minimind_template(upstream):
    """Our renderer in the minimind2 format, and our Jinja template for it, against MiniMind's own template
    (c090b69) on the random conversations of test_chat, without what the format refuses (tools, thinking)."""
    _, folder = upstream
    their_tok = AutoTokenizer.from_pretrained(folder)
    checked = 0
    for messages, _, kwargs in CONVERSATIONS:
        # MiniMind's template renders a content-part list empty: compare on the same text as plain strings.
        messages = [{**m, "content": "".join(p.get("text", "") for p in m["content"]
                                            if p.get("type", "text") == "text")}
                    if isinstance(m.get("content"), list) else m for m in messages]
        kwargs = {"add_generation_prompt": kwargs["add_generation_prompt"]}
        want = their_tok.apply_chat_template(messages, tokenize=False, **kwargs)
        assert render(messages, chat_format="minimind2", **kwargs) == want, messages
        assert their_tok.apply_chat_template(messages, tokenize=False, chat_template=CHAT_TEMPLATES["minimind2"],
                                             **kwargs) == want, messages
        checked += 1
    assert checked >= 300


# ------------------------------------------------------------------ our behaviour with a tag-less tokenizer


@pytest.fixture(scope="module")
def tagless_dir(tmp_path_factory):
    """A byte-level BPE with only <|endoftext|>, <|im_start|>, <|im_end|>, as MiniMind2's tokenizer."""
    directory = tmp_path_factory.mktemp("tagless")
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["the user asks and the assistant answers 你好 世界\n" * 50], trainer=trainer)
    raw.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def tagless_model_dir(tagless_dir, tmp_path_factory):
    tok = load_tokenizer(tagless_dir)
    return save_model(small_model("llama", vocab_size=len(tok)), tmp_path_factory.mktemp("m2") / "model", tok)


def test_tagless_tokenizer_gets_the_minimind2_format(tagless_dir):
    tok = load_tokenizer(tagless_dir)
    assert chat_format(tok) == "minimind2" and tok.chat_template == CHAT_TEMPLATES["minimind2"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "again"}]
    ids, mask = encode_chat(tok, messages, add_generation_prompt=True)
    text = ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
            "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids) == text
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "hello<|im_end|>"  # the loss covers the reply
    for kwargs in ({"enable_thinking": True}, {"tools": [{"type": "function", "function": {"name": "add"}}]}):
        word = "thinking" if "enable_thinking" in kwargs else "tools"
        with pytest.raises(ValueError, match=rf"^{word}: this model's tokenizer has no <think> </think> <tool_call>"):
            encode_chat(tok, messages, add_generation_prompt=True, **kwargs)


def test_thinking_and_tools_are_refused_clearly(tagless_model_dir, capsys):
    generate_cmd = ["generate", "--model", str(tagless_model_dir), "--max-new-tokens", "2", "--prompt", "hi"]
    assert main([*generate_cmd, "--think"]) == 2
    assert "thinking: this model's tokenizer has no <think>" in capsys.readouterr().err
    assert main(["chat", "--model", str(tagless_model_dir), "--tools", "all"]) == 2
    assert "tools: this model's tokenizer has no <think>" in capsys.readouterr().err
    assert main(generate_cmd) == 0

    app = create_app(load_model(tagless_model_dir), load_tokenizer(tagless_model_dir))
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with TestClient(app) as client:
        for extra, param in (({"chat_template_kwargs": {"enable_thinking": True}}, "enable_thinking"),
                             ({"open_thinking": True}, "enable_thinking"),
                             ({"tools": [{"type": "function", "function": {"name": "add"}}]}, "tools")):
            r = client.post("/v1/chat/completions", json={**base, **extra})
            assert r.status_code == 400, extra
            error = r.json()["error"]
            assert error["param"] == param and "has no <think> </think> <tool_call>" in error["message"]
        r = client.post("/v1/chat/completions", json={**base, "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(
            encode_chat(load_tokenizer(tagless_model_dir), base["messages"], add_generation_prompt=True)[0])


def test_export_of_a_minimind2_model(tagless_model_dir, tmp_path, tokenizer):
    meta, _, _ = read_gguf(export_gguf(tagless_model_dir, tmp_path / "m.gguf", "f32"))
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATES["minimind2"]
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    _, modelfile, _ = export_ollama(tagless_model_dir, tmp_path / "ollama", "f16")
    template = parse_modelfile(modelfile.read_text())["template"]
    assert template == go_template("minimind2")
    cases = [[{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "你好"}]]
    for messages in cases:
        want = render(messages, add_generation_prompt=True, chat_format="minimind2")
        assert GoTemplate(template).render(ollama_data(messages)) == want
    # An MoE with a shared expert has no GGUF architecture we can write exactly: a clear error, no file.
    moe = save_model(small_model("qwen2_moe", vocab_size=len(tokenizer)), tmp_path / "moe", tokenizer)
    with pytest.raises(MiniMindError, match="qwen2_moe .*cannot be exported to GGUF"):
        export_gguf(moe, tmp_path / "moe.gguf")
    assert not (tmp_path / "moe.gguf").exists()


def test_mixed_tags_are_refused(tmp_path):
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[PAD, BOS, EOS, "<think>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["some text " * 20], trainer=trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(MiniMindError, match=r"tokenizer\.json: missing the chat tags </think> <tool_call>"):
        load_tokenizer(tmp_path)
