"""The sampler, KV-cache decoding, stop handling and streaming."""

import json

import pytest
import torch
from conftest import small_model

from minimind.generation import Detokenizer, Sampler, SamplingParams, generate, stream

PROMPTS = [[5, 17, 33, 9, 100, 42, 7, 8, 200], [11, 12], [250, 3, 99, 4]]


def test_kv_cache_decoding_equals_full_recomputation(family):
    model = small_model(family, seed=2)
    model.config.eos_token_id = -1
    for params in (SamplingParams(max_new_tokens=24, temperature=0),
                   SamplingParams(max_new_tokens=24, temperature=1.0, top_k=50, seed=3)):
        cached = [c.token_ids for c in generate(model, None, PROMPTS, params)]
        full = [c.token_ids for c in generate(model, None, PROMPTS, params, use_cache=False)]
        assert cached == full
        assert all(len(t) == 24 for t in cached)


def test_batched_equals_one_by_one():
    model = small_model("qwen3", seed=4)
    model.config.eos_token_id = -1
    params = SamplingParams(max_new_tokens=16, temperature=0)
    batched = [c.token_ids for c in generate(model, None, PROMPTS, params)]
    alone = [generate(model, None, [p], params)[0].token_ids for p in PROMPTS]
    assert batched == alone


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = small_model("qwen3", seed=4)
    model.config.eos_token_id = -1
    run = lambda seed: generate(model, None, [PROMPTS[0]],  # noqa: E731
                                SamplingParams(max_new_tokens=30, temperature=1.5, seed=seed))[0].token_ids
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_eos_and_length_finish_reasons():
    model = small_model("qwen3", seed=4)
    params = SamplingParams(max_new_tokens=5, temperature=0)
    model.config.eos_token_id = -1
    first = generate(model, None, [PROMPTS[0]], params)[0]
    assert first.finish_reason == "length" and len(first.token_ids) == 5
    eos = model.config.eos_token_id = first.token_ids[-1]  # the last greedy token becomes "eos"
    out = generate(model, None, [PROMPTS[0]], params)[0]
    assert out.finish_reason == "stop" and out.token_ids == first.token_ids[:first.token_ids.index(eos)]
    assert out.prompt_tokens == len(PROMPTS[0])


def sampler(**kw):
    return Sampler([SamplingParams(**kw)], vocab_size=6, device=torch.device("cpu"))


LOGITS = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.1, 0.04, 0.01]]))


def draws(s, n=400):
    return {int(s(LOGITS)) for _ in range(n)}


def test_temperature_zero_is_argmax():
    assert draws(sampler(temperature=0), 5) == {1}


def test_top_k_top_p_min_p_restrict_the_candidates():
    assert draws(sampler(temperature=1, top_k=2, seed=0)) == {1, 2}
    # 0.5 + 0.3 covers top_p = 0.79: exactly those two tokens remain
    assert draws(sampler(temperature=1, top_p=0.79, seed=0)) == {1, 2}
    assert draws(sampler(temperature=1, top_p=0.81, seed=0)) == {1, 2, 3}
    # min_p 0.15 keeps probs >= 0.075: tokens 1, 2, 3
    assert draws(sampler(temperature=1, min_p=0.15, seed=0)) == {1, 2, 3}
    assert draws(sampler(temperature=1, seed=0), 2000) == {0, 1, 2, 3, 4, 5}


def test_repetition_penalty_is_ctrl_style():
    s = sampler(temperature=0, repetition_penalty=2.0)
    s.observe(torch.tensor([[1]]))
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0, 0.0, 0.0]])
    assert int(s(logits)) == 2  # 3.0 / 2 = 1.5 < 2.0
    s.observe(torch.tensor([[2, 3]]))
    assert int(s(torch.tensor([[0.0, 3.0, 2.0, -1.0, 0.5, 0.0]]))) == 1  # 1.5 vs 1.0 vs 0.5


def test_bad_sampling_settings_are_rejected():
    for kw in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_prompt_longer_than_context_is_rejected():
    model = small_model("qwen3")
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        generate(model, None, [[5] * 500], SamplingParams(max_new_tokens=20))


def test_streaming_never_splits_characters(tokenizer):
    text = "Hello 世界！ Привет 😀 naïve café — ünïcödé 中文字符测试"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 3  # the small test vocabulary splits characters into byte tokens
    d = Detokenizer(tokenizer, stop=())
    pieces = [d.add(t) for t in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_stop_strings_cut_the_text_and_are_never_streamed(tokenizer):
    text = "one two three STOP four five"
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = Detokenizer(tokenizer, stop=["STOP"])
    pieces = []
    for t in ids:
        pieces.append(d.add(t))
        if d.stopped:
            break
    pieces.append(d.flush())
    assert d.stopped and "".join(pieces) == "one two three "
    # A string that only starts like the stop string is released at the end.
    d = Detokenizer(tokenizer, stop=["STOPPED"])
    pieces = [d.add(t) for t in ids] + [d.flush()]
    assert not d.stopped and "".join(pieces) == text


def test_stream_yields_the_generated_text(tokenizer):
    model = small_model("qwen3", seed=1, vocab_size=len(tokenizer))
    model.config.eos_token_id = -1
    prompt = tokenizer.encode("The king", add_special_tokens=False)
    params = SamplingParams(max_new_tokens=20, temperature=0)
    full = generate(model, tokenizer, [prompt], params)[0]
    pieces = list(stream(model, tokenizer, prompt, params))
    assert "".join(pieces) == full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)


def test_sampling_defaults_come_from_generation_config(tmp_path):
    from minimind import MiniMindError
    from minimind.generation import GENERATION_DEFAULTS, sampling_defaults

    assert sampling_defaults(tmp_path) == {}  # no file: SamplingParams' own defaults
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {**GENERATION_DEFAULTS, "eos_token_id": 2, "repetition_penalty": 1.1, "min_p": None}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.85, "top_p": 0.85, "top_k": 50, "max_new_tokens": 512,
                                           "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.0}  # do_sample false: greedy, as transformers reads it
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": "high"}))
    with pytest.raises(MiniMindError, match="generation_config.json: field 'top_p' must be a number"):
        sampling_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(MiniMindError, match="generation_config.json: top_p must be in"):
        sampling_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(MiniMindError, match="generation_config.json: invalid JSON"):
        sampling_defaults(tmp_path)
