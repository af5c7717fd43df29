"""A model taught its answers with thinking is asked through every chat surface with that surface's thinking
default: the SFT stage wrote into its chat template that it thinks by default, and chat, generate, the API and
the web page's switch all follow it (the demo's model answered arithmetic with nonsense when they did not).
Decoding is greedy so that the answers are exact; only thinking is left to the defaults."""

import json

import pytest
from test_cli import run
from test_serve import start_server

from minimind.chat import thinks_by_default
from minimind.tokenizer import load_tokenizer

QUESTION = "What is 23 + 45?"
STEPS = "23 + 45\nones: 3 + 5 = 8\ntens: 2 + 4 = 6\nSo 23 + 45 = 68."
ANSWER = "The answer is 68."


@pytest.fixture(scope="module")
def thinking_model(sft_model_dir, tmp_path_factory):
    """The conftest SFT model, taught by heart: three of four rows think (the question), one does not."""
    from minimind.train.config import TrainConfig
    from minimind.train.loop import train
    from minimind.train.sft import SFTStage

    root = tmp_path_factory.mktemp("thinking")
    rows = [{"conversations": [{"role": "user", "content": QUESTION},
                               {"role": "assistant", "reasoning_content": STEPS, "content": ANSWER}]}] * 3
    rows.append({"conversations": [{"role": "user", "content": "Who are you?"},
                                   {"role": "assistant", "content": "I am MiniMind."}]})
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    return train(TrainConfig(stage="sft", out=str(root / "run"), data=str(root / "sft.jsonl"),
                             init_from=str(sft_model_dir), seq_len=128, batch_size=4, steps=80, lr=3e-3,
                             warmup_steps=2, workers=1, progress=False, log_every=100, dtype="float32"), SFTStage)


def test_the_sft_stage_writes_the_default_it_was_taught(thinking_model, sft_model_dir, tmp_path):
    assert thinks_by_default(load_tokenizer(thinking_model))
    assert not thinks_by_default(load_tokenizer(sft_model_dir))  # the built-in data: dialogues outnumber tasks
    from minimind.train.config import TrainConfig
    from minimind.train.loop import train
    from minimind.train.sft import SFTStage

    data = str(thinking_model.parent.parent / "sft.jsonl")
    off = train(TrainConfig(stage="sft", out=str(tmp_path / "off"), data=data, init_from=str(thinking_model),
                            seq_len=128, batch_size=4, steps=1, workers=1, progress=False, thinks_by_default="off"),
                SFTStage)
    assert not thinks_by_default(load_tokenizer(off))


def test_chat_and_generate_think_by_default(thinking_model):
    greedy = ("--model", str(thinking_model), "--max-new-tokens", "60", "--temperature", "0")
    out = run("chat", *greedy, stdin=QUESTION + "\n").stdout
    assert STEPS in out and ANSWER in out.split(STEPS, 1)[1]
    out = run("generate", *greedy, "--prompt", QUESTION).stdout
    assert STEPS in out and ANSWER in out


def test_the_api_and_the_page_follow_the_model_s_default(thinking_model):
    from openai import OpenAI

    from minimind.serve.webui import initial_settings, page_args

    proc, url = start_server(thinking_model)
    try:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        card = client.models.list().data[0].model_dump()
        assert card["thinks_by_default"] is True and initial_settings(page_args([]), card)["thinking"] is True
        ask = dict(model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=60, temperature=0)
        message = client.chat.completions.create(**ask).choices[0].message
        assert message.content == ANSWER and message.model_dump()["reasoning_content"] == STEPS
        off = client.chat.completions.create(**ask, extra_body={"enable_thinking": False}).choices[0]
        assert not off.message.model_dump().get("reasoning_content")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
