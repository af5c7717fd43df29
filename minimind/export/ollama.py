"""Ollama export: the GGUF plus a Modelfile with our chat format as a Go template (system, tools, thinking, tool
calls and results), stop tokens and sampling defaults. `minimind export ollama --model DIR --out DIR`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from minimind import MiniMindError
from minimind.chat import DEFAULT_SYSTEM, EMPTY_THINK, IM_END, IM_START, TOOLS_INTRO, TOOLS_OUTRO
from minimind.export.gguf import GGUF_TYPES, default_name, export_gguf
from minimind.generation import GENERATION_DEFAULTS, sampling_defaults

STOP_TOKENS = (IM_START, IM_END, "<|endoftext|>")
MAX_NUM_CTX = 8192  # Ollama allocates the whole context up front; MiniMind's own Modelfile uses 8192

# Our chat format (minimind.chat.render) in Ollama's Go template language. Ollama hands the template all system
# messages joined as .System, the conversation as .Messages (each with .Role, .Content, .Thinking, .ToolCalls),
# .Tools, and .Think (thinking requested). No newlines between actions: every character outside {{ }} is output.
# Differences from `render` that Go templates impose: tools and arguments are JSON without spaces (Go's
# encoding), later system messages are folded into the first, and a final assistant message is left open so
# Ollama can continue it. The minimind2 format (minimind.chat) has a default system turn and no think blocks.
def go_template(chat_format: str = "minimind-3") -> str:
    think_tags = chat_format == "minimind-3"
    return "".join([
        # system turn: the system text, then the tool list
        "{{ if or .System .Tools }}", f"{IM_START}system\n",
        "{{ if .System }}{{ .System }}{{ if .Tools }}\n\n{{ end }}{{ end }}",
        "{{ if .Tools }}", TOOLS_INTRO, "{{ range .Tools }}\n{{ json . }}{{ end }}", TOOLS_OUTRO, "{{ end }}",
        f"{IM_END}\n",
        "" if think_tags else f"{{{{ else }}}}{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n",
        "{{ end }}",
        '{{ $prev := "" }}',
        "{{ range $i, $m := .Messages }}",
        '{{ $rest := slice $.Messages $i }}{{ $last := eq (len $rest) 1 }}{{ $next := "" }}',
        "{{ if not $last }}{{ $next = (index $rest 1).Role }}{{ end }}",
        # user turn
        '{{ if eq .Role "user" }}', f"{IM_START}user\n{{{{ .Content }}}}{IM_END}\n",
        # assistant turn: thinking block (empty when none), content, tool calls
        '{{ else if eq .Role "assistant" }}', f"{IM_START}assistant\n",
        "<think>\n{{ .Thinking }}\n</think>\n\n" if think_tags else "",
        "{{ .Content }}",
        "{{ range $j, $c := .ToolCalls }}{{ if or $m.Content $j }}\n{{ end }}",
        '<tool_call>\n{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}\n</tool_call>',
        "{{ end }}",
        f"{{{{ if not $last }}}}{IM_END}\n{{{{ end }}}}",
        # tool results: consecutive ones share one user turn
        '{{ else if eq .Role "tool" }}', f'{{{{ if ne $prev "tool" }}}}{IM_START}user{{{{ end }}}}',
        "\n<tool_response>\n{{ .Content }}\n</tool_response>",
        f'{{{{ if ne $next "tool" }}}}{IM_END}\n{{{{ end }}}}',
        "{{ end }}",
        # generation prompt after the last non-assistant message
        '{{ if and $last (ne .Role "assistant") }}', f"{IM_START}assistant\n",
        f"{{{{ if $.Think }}}}<think>\n{{{{ else }}}}{EMPTY_THINK}{{{{ end }}}}" if think_tags else "", "{{ end }}",
        "{{ $prev = .Role }}",
        "{{ end }}",
    ])


TEMPLATE = go_template()


def modelfile_parameters(model_dir: str | Path, max_position_embeddings: int) -> dict[str, Any]:
    """Sampling defaults from generation_config.json (ours, or the defaults save_model writes) plus stop tokens."""
    gen = {**GENERATION_DEFAULTS, **sampling_defaults(model_dir)}
    params: dict[str, Any] = {
        "temperature": float(gen["temperature"]),
        "top_p": float(gen.get("top_p", 1.0)),
        "top_k": int(gen.get("top_k", 0)),
        # Ollama's default is 1.1; we sample without a penalty unless the model says otherwise
        "repeat_penalty": float(gen.get("repetition_penalty", 1.0)),
        "num_ctx": min(int(max_position_embeddings), MAX_NUM_CTX),
    }
    if gen.get("max_new_tokens"):
        params["num_predict"] = int(gen["max_new_tokens"])
    return params


def render_modelfile(gguf_name: str, params: dict[str, Any], template: str = TEMPLATE) -> str:
    if '"""' in template:
        raise MiniMindError('the chat template contains """, which a Modelfile cannot quote')
    lines = ["# Written by `minimind export ollama`. Create the model with: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in STOP_TOKENS]
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, Any]:
    """Read back what `render_modelfile` writes: {"from", "template", "stop": [...], "parameters": {...}}."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    source = re.search(r"^FROM (.+)$", text, re.M)
    out: dict[str, Any] = {"from": source.group(1) if source else None,
                           "template": template.group(1) if template else None, "stop": [], "parameters": {}}
    for key, value in re.findall(r"^PARAMETER (\S+) (.+)$", text, re.M):
        if key == "stop":
            out["stop"].append(json.loads(value))
        else:
            out["parameters"][key] = float(value) if "." in value else int(value)
    return out


def export_ollama(model_dir: str | Path, out_dir: str | Path, qtype: str = "q8_0",
                  name: str | None = None) -> tuple[Path, Path, str]:
    """Write OUT/<name>-<type>.gguf and OUT/Modelfile; return (GGUF path, Modelfile path, `ollama create` command)."""
    from minimind.chat import chat_format
    from minimind.config import ModelConfig
    from minimind.files import atomic_path
    from minimind.tokenizer import load_tokenizer

    if qtype not in GGUF_TYPES:
        raise MiniMindError(f"--type must be one of {', '.join(GGUF_TYPES)}, not {qtype!r}")
    cfg = ModelConfig.load(model_dir)
    name = name or default_name(model_dir)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise MiniMindError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf_name = f"{name}-{qtype}.gguf"
    template = go_template(chat_format(load_tokenizer(model_dir)))
    gguf_path = export_gguf(model_dir, out_dir / gguf_name, qtype, name)
    modelfile = out_dir / "Modelfile"
    with atomic_path(modelfile) as tmp:
        tmp.write_text(render_modelfile(gguf_name, modelfile_parameters(model_dir, cfg.max_position_embeddings),
                                        template))
    return gguf_path, modelfile, f"ollama create {name.lower()} -f {modelfile}"
