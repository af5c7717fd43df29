"""Byte-level BPE tokenizer: training (Qwen2's pre-tokenizer, MiniMind's 36 added tokens), saving, loading.
`tok = train_tokenizer(["corpus.jsonl"], 6400, out_dir="tok/")`; `tok = load_tokenizer("tok/")`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minimind import MiniMindError
from minimind.chat import CHAT_TEMPLATE, CHAT_TEMPLATES, chat_format, render

# MiniMind's added tokens in id order (0..35). Its published weights index them by these ids.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    *(f"<|buffer{i}|>" for i in range(1, 10)),
]
# Only the first 21 are "special". The tool and think tags must survive decode(skip_special_tokens=True),
# because the parsers in chat.py read them from decoded text.
NUM_SPECIAL = 21
PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2's pre-tokenizer split. llama.cpp knows it by name, so a GGUF export tokenizes exactly as we do.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER = "qwen2"
MODEL_MAX_LENGTH = 131072
TEXT_SUFFIXES = (".txt", ".text", ".md")


def iter_texts(files: Iterable[str | Path]) -> Iterator[str]:
    """Stream training text from files, one piece at a time (never the whole file in memory).

    `.txt` yields lines; `.jsonl` yields each row's `text`, or its `conversations` / `messages` rendered with
    the chat template (tools, tool calls and all), which is the text the model will read."""
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise MiniMindError(f"{path}: no such file")
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES + (".jsonl",):
            raise MiniMindError(f"{path}: unsupported file type {suffix or '(none)'}; use .txt or .jsonl")
        with path.open(encoding="utf-8", errors="replace") as fh:
            if suffix != ".jsonl":
                yield from fh
                continue
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield _row_text(line, f"{path}:{lineno}")


_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _row_text(line: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise MiniMindError(f"{where}: invalid JSON ({e.msg})") from None
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    messages = row.get("conversations", row.get("messages")) if isinstance(row, dict) else None
    if not isinstance(messages, list):
        raise MiniMindError(f"{where}: row has no 'text', 'conversations' or 'messages'")
    try:
        text = render(row)
    except (MiniMindError, ValueError):
        pass  # a malformed conversation still has text worth learning from; training will reject the row
    else:
        return _SPECIAL_RE.sub("\n", text)  # special tokens are atomic: no merges to learn inside them
    pieces = []
    for m in messages:
        if isinstance(m, dict):
            pieces += [m[k] for k in ("reasoning_content", "content") if isinstance(m.get(k), str)]
    return "\n".join(pieces)


def train_tokenizer(files: list[str | Path], vocab_size: int = 6400, *, out_dir: str | Path,
                    progress: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `files`, save it in the Hugging Face layout in `out_dir`, return it loaded.

    Ids 0..35 are SPECIAL_TOKENS; the 256 byte symbols come next, then the learned merges."""
    if not files:
        raise MiniMindError("train_tokenizer: no input files given")
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size <= floor:
        raise MiniMindError(f"vocab_size {vocab_size} is too small: the tokens and bytes alone take {floor}")
    tok = Tokenizer(models.BPE())
    # Split with Qwen2's regex first, then map bytes to symbols without a second regex: the same pipeline
    # as Qwen2's own tokenizer.json, and what llama.cpp's `qwen2` pre-tokenizer reproduces.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # listed first, so they take ids 0..35
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(iter_texts(files), trainer=trainer)
    if tok.get_vocab_size() < vocab_size:
        names = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise MiniMindError(f"{names}: too little text, BPE learned only {tok.get_vocab_size()} of "
                            f"{vocab_size} tokens; give more text or a smaller vocab_size")
    tok = _mark_special(tok)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD,
        model_max_length=MODEL_MAX_LENGTH, chat_template=CHAT_TEMPLATE,
    )
    save_tokenizer(hf, out_dir)
    return load_tokenizer(out_dir)


def _mark_special(tok: Tokenizer) -> Tokenizer:
    """The trainer adds all 36 as special; clear the flag on ids 21..35. Editing the JSON and reloading is
    the one way that also updates the set decode() skips."""
    data = json.loads(tok.to_str())
    for entry in data["added_tokens"]:
        entry["special"] = entry["id"] < NUM_SPECIAL
        entry["normalized"] = False
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (with chat_template) and special_tokens_map.json.

    Written by hand rather than by save_pretrained: transformers 5 would name the class TokenizersBackend
    and move the template to chat_template.jinja, which older transformers and MiniMind's code can't read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    decoder = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())
    }
    names = {"bos_token": tokenizer.bos_token or BOS, "eos_token": tokenizer.eos_token or EOS,
             "pad_token": tokenizer.pad_token or PAD, "unk_token": tokenizer.unk_token or PAD}
    template = tokenizer.chat_template
    if not isinstance(template, str):
        template = CHAT_TEMPLATES[_format(tokenizer, out / "tokenizer.json")]
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        **names,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": template,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", names)
    (out / "chat_template.jinja").unlink(missing_ok=True)  # a stale one would override the config's


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory (or its tokenizer.json) and check it is one our chat formats can use:
    `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` at ids 0, 1, 2, and either all the think/tool tags (the
    minimind-3 format) or none of them (MiniMind2's tokenizer: the minimind2 format, see minimind.chat)."""
    path = Path(path)
    directory = path.parent if path.name == "tokenizer.json" else path
    file = directory / "tokenizer.json"
    if not directory.is_dir():
        raise MiniMindError(f"{directory}: no such directory")
    if not file.is_file():
        raise MiniMindError(f"{file}: missing; {directory} is not a tokenizer directory")
    try:
        Tokenizer.from_file(str(file))  # its own errors are clearer than those of transformers
    except Exception as e:  # any parse failure is one problem to the user
        raise MiniMindError(f"{file}: unreadable tokenizer ({_one_line(e)})") from None
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(directory))
    except Exception as e:
        raise MiniMindError(f"{directory / 'tokenizer_config.json'}: cannot load ({_one_line(e)})") from None

    vocab = tok.get_vocab()
    for want_id, token in enumerate((PAD, BOS, EOS)):
        got = vocab.get(token)
        if got != want_id:
            found = "missing" if got is None else f"at {got}"
            raise MiniMindError(f"{file}: {token} must be id {want_id}, but it is {found}")
    fmt = _format(tok, file)
    # Older or foreign tokenizer directories may lack these; fill in what our chat format needs.
    if tok.eos_token is None:
        tok.eos_token = EOS
    if tok.bos_token is None:
        tok.bos_token = BOS
    if tok.pad_token is None:
        tok.pad_token = PAD
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATES[fmt]
    return tok


def _format(tokenizer: Any, file: Path) -> str:
    try:
        return chat_format(tokenizer)
    except ValueError as e:
        raise MiniMindError(f"{file}: {e}") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def chars_per_token(tokenizer: Any, text: str) -> float:
    """Compression: characters per token of `text` (no special tokens added). 0.0 for empty text."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    n = len(enc.ids) if hasattr(enc, "ids") else len(enc)
    return len(text) / n if n else 0.0
