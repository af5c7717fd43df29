"""The `minimind` command, run as a real subprocess the way a user runs it."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import CORPUS, small_model

from minimind import cli
from minimind.checkpoint import load_model, save_model


def run(*args, stdin=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "minimind", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    save_model(small_model("qwen3", vocab_size=len(tokenizer)), d, tokenizer)
    return d


def test_help_lists_every_command():
    out = run("--help").stdout
    for command in ("demo", "tokenizer", "init", "chat", "generate"):
        assert command in out
    assert "--top-p" in run("generate", "--help").stdout


def test_tokenizer_train_and_init(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in CORPUS * 40))
    out = run("tokenizer", "train", "--data", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "tok"),
              "--quiet").stdout
    assert "saved a 400-token tokenizer" in out and "characters per token" in out
    out = run("init", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "m")).stdout
    assert "tiny" in out
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["vocab_size"] == 400
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()


def test_generate_prints_only_the_generated_text(model_dir, tokenizer):
    args = ("generate", "--model", str(model_dir), "--max-new-tokens", "8", "--temperature", "0", "--dtype", "float32")
    a = run(*args, "--prompt", "The king").stdout
    b = run(*args, "--prompt", "-", stdin="The king").stdout
    assert a == b and a.endswith("\n") and len(a) > 1
    raw = run(*args, "--prompt", "The king", "--raw").stdout
    # Same model, same greedy decoding, in-process: the CLI printed exactly that.
    from minimind.chat import encode_chat
    from minimind.checkpoint import load_model
    from minimind.generation import SamplingParams, generate

    model = load_model(model_dir)
    ids, _ = encode_chat(tokenizer, [{"role": "user", "content": "The king"}], add_generation_prompt=True)
    expected = generate(model, tokenizer, [ids], SamplingParams(max_new_tokens=8, temperature=0))[0].text
    assert a == expected + "\n"
    plain = tokenizer.encode("The king", add_special_tokens=False)
    assert raw == generate(model, tokenizer, [plain], SamplingParams(max_new_tokens=8, temperature=0))[0].text + "\n"


def test_chat_session_over_stdin(model_dir):
    proc = run("chat", "--model", str(model_dir), "--max-new-tokens", "6", "--temperature", "0",
               stdin="hello there\n/clear\n" + "word " * 600 + "\nsecond question\n")
    assert proc.stdout.count("tokens/s]") == 2
    assert "(conversation cleared)" in proc.stdout
    assert "[error: prompt" in proc.stdout and "exceeds the model's context" in proc.stdout  # and the chat went on
    assert "Traceback" not in proc.stderr


def test_chat_ctrl_c_stops_the_answer_and_keeps_going(model_dir, monkeypatch, capsys):
    lines = iter(["first", "second"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    calls = {"n": 0}
    import minimind.generation as gen  # chat imports `stream` when it runs, so patching the module works

    original = gen.stream

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        for i, piece in enumerate(original(*args, **kwargs)):
            if calls["n"] == 1 and i == 2:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(gen, "stream", interrupted)
    code = cli.main(["chat", "--model", str(model_dir), "--max-new-tokens", "6", "--temperature", "0"])
    out = capsys.readouterr().out
    assert code == 0 and calls["n"] == 2
    assert "[stopped]" in out and out.count("tokens/s]") == 2


@pytest.mark.parametrize("args, message", [
    (("generate", "--model", "/no/such/dir", "--prompt", "hi"), "/no/such/dir: model directory not found"),
    (("generate", "--model", "{model}", "--prompt", "hi", "--top-p", "0"), "top_p must be in (0, 1]"),
    (("init", "--preset", "huge", "--tokenizer", "{model}", "--out", "{tmp}/x"), "unknown preset 'huge'"),
    (("init", "--tokenizer", "{tmp}", "--out", "{tmp}/x"), "tokenizer.json"),
    (("tokenizer", "train", "--data", "{tmp}/missing.txt", "--out", "{tmp}/t"), "missing.txt: file not found"),
    (("generate", "--model", "{model}", "--prompt", "word " * 600), "exceeds the model's context of 512 tokens"),
])
def test_bad_input_is_one_clear_line(args, message, model_dir, tmp_path):
    args = [a.format(model=model_dir, tmp=tmp_path) for a in args]
    proc = run(*args, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr


def test_chat_tools_runs_the_model_s_tool_call_and_feeds_back_the_result(sft_model_dir, tmp_path):
    """A model taught one tool conversation calls the calculator; the chat runs the call in the sandbox,
    feeds the result back, and the model answers with it."""
    from minimind.tools import tool_schemas
    from minimind.train.config import TrainConfig
    from minimind.train.loop import train
    from minimind.train.sft import SFTStage

    row = {"tools": tool_schemas(), "conversations": [
        {"role": "user", "content": "What is 23 * 45?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"name": "calculator", "arguments": {"expression": "23*45"}}]},
        {"role": "tool", "content": "1035"},
        {"role": "assistant", "content": "The answer is 1035."}]}
    data = tmp_path / "tool.jsonl"
    data.write_text((json.dumps(row) + "\n") * 32)
    # Every row is the same, so one row a step gives the gradient of a batch of them at a quarter of the cost.
    taught = train(TrainConfig(stage="sft", out=str(tmp_path / "run"), data=str(data), init_from=str(sft_model_dir),
                               seq_len=768, batch_size=1, steps=80, lr=3e-3, warmup_steps=2, workers=1,
                               progress=False, log_every=100, dtype="float32"), SFTStage)
    out = run("chat", "--model", str(taught), "--tools", "--temperature", "0", "--max-new-tokens", "40",
              "--dtype", "float32",
              stdin="What is 23 * 45?\n").stdout
    assert '[tool] calculator({"expression": "23*45"}) -> 1035' in out
    assert "The answer is 1035." in out.split("-> 1035", 1)[1]


def test_train_lora_then_generate_with_it_equals_the_merged_model(sft_model_dir, tmp_path):
    model_dir = sft_model_dir
    rows = [{"conversations": [{"role": "user", "content": "Who are you?"},
                               {"role": "assistant", "content": "I am LoRA-Mind."}]}] * 8
    data = tmp_path / "id.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("train", "lora", "--data", str(data), "--init_from", str(model_dir), "--out", str(tmp_path / "lora"),
        "--steps", "20", "--lr", "1e-2", "--seq_len", "128", "--batch_size", "4", "--lora_rank", "4",
        "--progress", "false", "--dtype", "float32")
    adapter = tmp_path / "lora" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    run("lora", "merge", "--model", str(model_dir), "--lora", str(adapter), "--out", str(tmp_path / "merged"))
    flags = ["--prompt", "Who are you?", "--temperature", "0", "--max-new-tokens", "12", "--dtype", "float32"]
    with_lora = run("generate", "--model", str(model_dir), "--lora", str(adapter), *flags).stdout
    merged = run("generate", "--model", str(tmp_path / "merged"), *flags).stdout
    assert with_lora == merged
    # The adapter learnt something and the merge carries it: the fixture's greedy reply may stay the same (it is
    # barely trained), so compare the models themselves.
    losses = [json.loads(line)["loss"] for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0] - 0.5
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert (load_model(tmp_path / "merged")(ids).logits - load_model(model_dir)(ids).logits).abs().max() > 0.1


def test_generation_config_is_the_default_and_flags_override_it(tokenizer, tmp_path, capsys):
    """A model whose generation_config.json says greedy decodes greedily with no sampling flags (the same text
    every run, equal to in-process greedy decoding); --temperature overrides it."""
    from minimind.chat import encode_chat
    from minimind.generation import SamplingParams, generate
    from minimind.inference import sampling_params

    d = tmp_path / "greedy"
    save_model(small_model("qwen3", vocab_size=len(tokenizer)), d, tokenizer,
               generation={"do_sample": False, "max_new_tokens": 10})
    assert sampling_params(d) == SamplingParams(temperature=0.0, top_p=0.85, top_k=50, max_new_tokens=10)
    assert sampling_params(d, temperature=0.5, top_k=None).temperature == 0.5  # None: the model's value stays

    def cli_generate(*flags: str) -> str:
        assert cli.main(["generate", "--model", str(d), "--prompt", "The king", "--dtype", "float32", *flags]) == 0
        return capsys.readouterr().out

    ids, _ = encode_chat(tokenizer, [{"role": "user", "content": "The king"}], add_generation_prompt=True)
    greedy = generate(load_model(d), tokenizer, [ids], SamplingParams(max_new_tokens=10, temperature=0))[0].text
    assert cli_generate() == cli_generate() == greedy + "\n"
    sampled = {cli_generate("--temperature", "1", "--top-k", "0", "--top-p", "1", "--seed", str(s)) for s in range(3)}
    assert sampled != {greedy + "\n"}  # a random model sampled at temperature 1: not the greedy text every time
    assert cli_generate("--max-new-tokens", "3") == \
        generate(load_model(d), tokenizer, [ids], SamplingParams(max_new_tokens=3, temperature=0))[0].text + "\n"
    assert "generation_config.json" in run("generate", "--help").stdout


def test_eval_with_lora_and_quantize(sft_model_dir, tmp_path):
    """`eval --lora --quantize int8` scores the model with the adapter folded in, then quantised: the same
    figure as scoring that model in-process, and another than the quantised base model's."""
    from test_lora import with_random_adapter

    from minimind.eval.perplexity import score_texts
    from minimind.inference import load_for_inference
    from minimind.lora import save_adapter

    model = load_model(sft_model_dir, dtype=torch.float32)
    with_random_adapter(model)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_dir=sft_model_dir)
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in CORPUS))
    args = ["eval", "--model", str(sft_model_dir), "--task", "ppl", "--data", str(text), "--dtype", "float32"]
    assert cli.main([*args, "--lora", str(adapter), "--quantize", "int8", "--out", str(tmp_path / "q.json")]) == 0
    record = json.loads((tmp_path / "q.json").read_text())
    assert record["lora"] == str(adapter) and record["quantize"] == "int8"

    def loss(lora):
        m, tok = load_for_inference(sft_model_dir, lora=lora, dtype="float32", quantize="int8")
        return score_texts(m, tok, CORPUS, seq_len=512, batch_size=16).loss

    assert record["metrics"]["loss"] == pytest.approx(loss(adapter), rel=1e-6)
    assert record["metrics"]["loss"] != pytest.approx(loss(None), rel=1e-4)


def test_train_takes_dashed_and_underscored_flags(model_dir, tmp_path):
    """--init-from and --init_from set the same setting; --no-progress and --progress false turn the bar off;
    `train --help` lists the dashed spelling."""
    from minimind.train.config import load_config

    dashed = load_config(None, ["--init-from", "m", "--seq-len", "64", "--no-progress", "--out=runs/a-b"])
    underscored = load_config(None, ["--init_from", "m", "--seq_len", "64", "--progress", "false", "--out", "runs/a-b"])
    assert dashed == underscored and dashed.init_from == "m" and not dashed.progress and dashed.out == "runs/a-b"
    assert load_config(None, ["--no-progress", "--progress"]).progress
    help_text = " ".join(run("train", "--help").stdout.split())
    assert "--init-from" in help_text and "--no-progress" in help_text and "--init_from" in help_text
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 4))
    for n, init in enumerate(("--init-from", "--init_from")):
        out = tmp_path / f"run{n}"
        assert cli.main(["train", "pretrain", "--data", str(data), init, str(model_dir), "--out", str(out),
                         "--steps", "2", "--seq-len", "64", "--batch-size", "2", "--no-progress", "--workers", "1",
                         "--dtype", "float32"]) == 0
        settings = (out / "config.toml").read_text()
        assert f'init_from = "{model_dir}"' in settings and "progress = false" in settings
