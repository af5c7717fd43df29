"""Tokenizer tests: train a throwaway byte-level BPE on generated English+Chinese text, then check ids,
files, loading, round trips and error messages. `pytest tests/test_tokenizer.py`."""

import json
import random
import re
import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from minimind import MiniMindError
from minimind.chat import CHAT_TEMPLATE, render
from minimind.tokenizer import (
    BOS,
    EOS,
    NUM_SPECIAL,
    PAD,
    QWEN2_SPLIT_REGEX,
    SPECIAL_TOKENS,
    chars_per_token,
    iter_texts,
    load_tokenizer,
    train_tokenizer,
)

VOCAB = 800
EN = ("the quick brown fox jumps over a lazy dog while small birds sing in the early morning light "
      "and children play near old river banks under blue sky").split()
ZH = list("我们你他她是的了在有个人这中大为上来说国年着就那和要出也得里后自以会家可下而过天去能对小多然于心学"
          "么之都好看起发当没成只如事把还用第样道想作种开美总从无情己面最女但现前些所同日手又行意动方期它头经长")


def write_corpus(path, lines: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(lines):
            words = " ".join(rng.choices(EN, k=rng.randint(4, 14))).capitalize()
            f.write(f"{words}, {rng.randint(0, 999)}. ")
            f.write("".join(rng.choices(ZH, k=rng.randint(5, 20))) + "。\n")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_corpus(root / "corpus.txt", 3000)
    train_tokenizer([root / "corpus.txt"], VOCAB, out_dir=root / "tokenizer", progress=False)
    return root / "tokenizer"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_special_token_list():
    assert len(SPECIAL_TOKENS) == 36 and len(set(SPECIAL_TOKENS)) == 36
    expected = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 12: "<|image_pad|>",
                20: "<tts_text_bos_single>", 21: "<tool_call>", 22: "</tool_call>", 23: "<tool_response>",
                24: "</tool_response>", 25: "<think>", 26: "</think>", 27: "<|buffer1|>", 35: "<|buffer9|>"}
    for i, t in expected.items():
        assert SPECIAL_TOKENS[i] == t


def test_special_token_ids_and_flags(tok):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == i
        assert tok.encode(t, add_special_tokens=False) == [i]  # one token, never split by BPE
        assert tok.added_tokens_decoder[i].content == t
        assert tok.added_tokens_decoder[i].special == (i < NUM_SPECIAL)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.unk_token == "<|endoftext|>"


def test_files_written(tok_dir):
    names = {p.name for p in tok_dir.iterdir()}
    assert names == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == config["unk_token"] == "<|endoftext|>"
    assert config["model_max_length"] == 131072
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["chat_template"] == CHAT_TEMPLATE
    think = config["added_tokens_decoder"]["25"]
    assert think == {"content": "<think>", "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": False}
    special_map = json.loads((tok_dir / "special_tokens_map.json").read_text())
    assert special_map["eos_token"] == "<|im_end|>"


def test_pipeline_is_qwen2_byte_level(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    assert data["normalizer"] is None
    assert data["model"]["type"] == "BPE" and not data["model"].get("byte_fallback")
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"]["Regex"] == QWEN2_SPLIT_REGEX
    assert split["behavior"] == "Isolated" and split["invert"] is False
    assert byte_level["type"] == "ByteLevel"
    assert byte_level["add_prefix_space"] is False and byte_level["use_regex"] is False
    assert data["decoder"]["type"] == "ByteLevel"
    # Ids after the added tokens are the 256 byte symbols, then the merges.
    assert len(data["model"]["merges"]) == VOCAB - len(SPECIAL_TOKENS) - 256


def test_autotokenizer_loads_it(tok_dir):
    auto = AutoTokenizer.from_pretrained(tok_dir)
    assert len(auto) == VOCAB
    assert auto.eos_token_id == 2 and auto.pad_token_id == 0
    messages = [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "Hi"}]
    text = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render(messages, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("text", [
    "The quick brown fox, 2024!",
    "我们在学习。混合 English 和中文 text。",
    "emoji 😀🎉👩‍👩‍👧 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃",
    "  leading spaces\n\n\ttabs\r\nand CRLF  ",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call>",
    "",
])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert all(0 <= i < VOCAB for i in ids)


def test_think_and_tool_tags_survive_skip_special(tok):
    text = "<|im_start|>assistant\n<think>\nhmm\n</think>\n\n<tool_call>\n{\"a\": 1}\n</tool_call><|im_end|>"
    out = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert out == "assistant\n<think>\nhmm\n</think>\n\n<tool_call>\n{\"a\": 1}\n</tool_call>"
    assert tok.decode([23, 24, 30], skip_special_tokens=True) == "<tool_response></tool_response><|buffer4|>"


def test_chars_per_token(tok):
    english = "the quick brown fox jumps over a lazy dog while small birds sing"
    assert chars_per_token(tok, english) > 2.0
    assert chars_per_token(tok, "我们你他她是的了在有个人这中大为") >= 1.0  # every 3-byte character merged
    assert chars_per_token(tok, "") == 0.0
    assert chars_per_token(tok.backend_tokenizer, english) == chars_per_token(tok, english)


def test_jsonl_input(tmp_path):
    rows = [{"text": "plain pretraining text " * 3},
            {"conversations": [{"role": "user", "content": "问题"},
                               {"role": "assistant", "content": "答案", "reasoning_content": "想一想"}]},
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": None}]}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    # Conversations are read as the chat template renders them, special tokens cut out (they are atomic).
    texts = list(iter_texts([path]))
    assert texts[0] == "plain pretraining text " * 3
    assert texts[1] == "\nuser\n问题\n\n\nassistant\n\n\n想一想\n\n\n\n答案\n\n"
    assert "<|im_start|>" not in texts[2] and "hello" in texts[2]
    with pytest.raises(MiniMindError, match="too little text"):
        train_tokenizer([path], 5000, out_dir=tmp_path / "t", progress=False)


def test_input_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(MiniMindError, match=r"bad\.jsonl:2: invalid JSON"):
        list(iter_texts([bad]))
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"chosen": []}\n')
    with pytest.raises(MiniMindError, match=r"odd\.jsonl:1: row has no 'text'"):
        list(iter_texts([odd]))
    with pytest.raises(MiniMindError, match=r"nope\.txt: no such file"):
        list(iter_texts([tmp_path / "nope.txt"]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(MiniMindError, match=r"x\.csv: unsupported file type"):
        list(iter_texts([tmp_path / "x.csv"]))
    with pytest.raises(MiniMindError, match="vocab_size 100 is too small"):
        train_tokenizer([bad], 100, out_dir=tmp_path / "t", progress=False)


def write_raw_tokenizer(directory, specials):
    """A bare tokenizer.json with the given added tokens, to test what load_tokenizer rejects."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(["some text for training " * 20], trainer=trainer)
    directory.mkdir()
    raw.save(str(directory / "tokenizer.json"))
    return directory


def test_load_errors(tmp_path, tok_dir):
    with pytest.raises(MiniMindError, match=r"missing_dir: no such directory"):
        load_tokenizer(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiniMindError, match=r"empty/tokenizer\.json: missing"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "tokenizer.json").write_text("{not json")
    with pytest.raises(MiniMindError, match=r"garbage/tokenizer\.json: unreadable tokenizer"):
        load_tokenizer(tmp_path / "garbage")

    swapped = write_raw_tokenizer(tmp_path / "swapped", [PAD, EOS, BOS])
    wrong_id = re.escape("swapped/tokenizer.json: <|im_start|> must be id 1, but it is at 2")
    with pytest.raises(MiniMindError, match=wrong_id):
        load_tokenizer(swapped)
    no_tags = write_raw_tokenizer(tmp_path / "no_tags", [PAD, BOS, EOS, "<think>"])
    with pytest.raises(MiniMindError, match=r"no_tags/tokenizer\.json: missing the chat tags </think> <tool"):
        load_tokenizer(no_tags)
    with pytest.raises(MiniMindError) as info:
        load_tokenizer(no_tags)
    assert "\n" not in str(info.value)  # one line, for the CLI


def test_load_fills_missing_chat_template(tmp_path, tok_dir):
    copy = tmp_path / "copy"
    shutil.copytree(tok_dir, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(copy / "tokenizer.json")  # the file path works as well as the directory
    assert loaded.chat_template == CHAT_TEMPLATE
    assert len(loaded) == VOCAB
