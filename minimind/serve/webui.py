"""The web chat page (Streamlit): streamed answers, history, a collapsible thinking section, tools with the tool
loop shown, sampling settings, an image upload for a vision model. `minimind webui --model DIR`, or
`streamlit run webui.py -- --api URL`.

It talks to the OpenAI-compatible API (minimind.serve.api) through the official `openai` client.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from dataclasses import asdict

import streamlit as st

from minimind.generation import SamplingParams
from minimind.tools import TOOLS, ToolLoop, tool_schemas

MAX_TOOL_ROUNDS = 4  # model -> tool -> model ... at most this many calls per question


def page_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="webui.py")
    p.add_argument("--api", default="http://127.0.0.1:8998/v1", help="the API's base URL (ending in /v1)")
    model = " (default: the model's generation_config.json, from the API's model card)"
    p.add_argument("--temperature", type=float, default=None, help="initial temperature, 0 = greedy" + model)
    p.add_argument("--top-p", type=float, default=None, help="initial top_p" + model)
    p.add_argument("--max-tokens", type=int, default=None, help="initial max_tokens" + model)
    return p.parse_known_args(argv)[0]


def initial_settings(args: argparse.Namespace, card: dict) -> dict:
    """The controls' starting values: the page's own flag when given, else the model's sampling defaults from its
    card in /v1/models, else SamplingParams' own (what the API samples with when a request leaves them out); the
    thinking switch as the model's default (its card's thinks_by_default)."""
    model = {**asdict(SamplingParams()), **(card.get("sampling_defaults") or {})}
    flags = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
    defaults = {"temperature": model["temperature"], "top_p": model["top_p"], "max_tokens": model["max_new_tokens"]}
    return {**{key: defaults[key] if flag is None else flag for key, flag in flags.items()},
            "thinking": bool(card.get("thinks_by_default"))}


@st.cache_resource
def client(api: str):
    from openai import OpenAI

    return OpenAI(base_url=api, api_key=os.environ.get("MINIMIND_API_KEY") or "none", max_retries=1)


@st.cache_data(ttl=60)
def model_card(api: str) -> dict:
    try:
        m = client(api).models.list().data[0]
        return {"id": m.id, **(m.model_extra or {})}
    except Exception as e:  # shown on the page; the chat itself reports its own errors
        return {"id": "unreachable", "error": str(e)}


def user_message(text: str, image: bytes | None = None, mime: str = "image/png") -> dict:
    """The user's message as the API takes it: plain text, or with an uploaded image an OpenAI content-part list
    (the image as a base64 data URL, first: the server puts it on its own line before the text)."""
    if image is None:
        return {"role": "user", "content": text}
    url = f"data:{mime};base64,{base64.b64encode(image).decode()}"
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def show_content(content) -> None:
    """A message's content: text, or content parts (text and images)."""
    if isinstance(content, str):
        st.markdown(content)
        return
    for part in content:
        if part.get("type") == "image_url":
            st.image(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]), width=160)
        elif part.get("text"):
            st.markdown(part["text"])


def show_tool_call(call: dict, result: str | None) -> None:
    fn = call["function"]
    with st.expander(f"Tool call: {fn['name']}({fn['arguments']})", expanded=False):
        st.code(f"arguments: {fn['arguments']}\nresult: {result}", language="text")


def show_history(messages: list[dict]) -> None:
    results = {m.get("tool_call_id"): m["content"] for m in messages if m["role"] == "tool"}
    for m in messages:
        if m["role"] == "tool":
            continue
        with st.chat_message(m["role"]):
            if m.get("reasoning_content"):
                with st.expander("Thinking", expanded=False):
                    st.markdown(m["reasoning_content"])
            for call in m.get("tool_calls") or []:
                show_tool_call(call, results.get(call.get("id")))
            if m.get("content"):
                show_content(m["content"])


def stream_reply(api: str, messages: list[dict], settings: dict) -> dict:
    """One streamed assistant turn, drawn as it arrives; returns the message (content, reasoning, tool calls)."""
    reasoning, content, calls = "", "", {}
    think_box = st.expander("Thinking", expanded=True) if settings["thinking"] else None
    think_slot = think_box.empty() if think_box else None
    slot = st.empty()
    # The switch at the model's default sends nothing, so a model that thinks by default decides for itself
    # (it writes an empty think block for a greeting); moved, it asks for thinking on or off.
    asked = settings["thinking"] if settings["thinking"] != settings["thinks_by_default"] else None
    extra = {"chat_template_kwargs": {"enable_thinking": asked}} if asked is not None else {}
    stream = client(api).chat.completions.create(
        model=settings["model"], messages=messages, stream=True, temperature=settings["temperature"],
        top_p=settings["top_p"], max_tokens=settings["max_tokens"], tools=settings["tools"] or None,
        extra_body=extra)
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        piece = (delta.model_extra or {}).get("reasoning_content")
        if piece and think_slot is not None:
            reasoning += piece
            think_slot.markdown(reasoning + "▌")
        for tc in delta.tool_calls or []:
            calls[tc.index] = {"id": tc.id, "type": "function",
                               "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
        if delta.content:
            content += delta.content
            slot.markdown(content + "▌")
    if think_slot is not None:
        think_slot.markdown(reasoning or "_(no thinking)_")
    slot.markdown(content)
    message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


def main() -> None:
    args = page_args(sys.argv[1:])
    st.set_page_config(page_title="MiniMind chat", page_icon="💬")
    card = model_card(args.api)
    with st.sidebar:
        st.header("MiniMind")
        size = card.get("parameters")
        st.markdown(f"**Model:** `{card['id']}`" + (f"  \n**Size:** {size / 1e6:.1f}M parameters" if size else "")
                    + (f"  \n**Context:** {card['context_length']} tokens" if card.get("context_length") else ""))
        if card.get("error"):
            st.error(f"API at {args.api} unreachable: {card['error']}")
        start = initial_settings(args, card)
        thinking = st.toggle("Thinking", value=start["thinking"],
                             help="let the model think first (enable_thinking); starts as the model's default")
        chosen = st.multiselect("Tools", list(TOOLS), default=[], help="functions the model may call")
        temperature = st.slider("Temperature", 0.0, 2.0, float(start["temperature"]), 0.05)
        top_p = st.slider("Top-p", 0.05, 1.0, float(start["top_p"]), 0.05)
        max_tokens = st.number_input("Max tokens", 1, 8192, int(start["max_tokens"]), 16)
        upload = None
        if card.get("vision"):  # the uploader's key changes once its image is sent: it empties for the next
            upload = st.file_uploader("Image for the next message", type=["png", "jpg", "jpeg", "webp", "gif", "bmp"],
                                      key=f"image-{st.session_state.setdefault('uploads', 0)}")
        if st.button("Clear history"):
            st.session_state.messages = []
    st.title("MiniMind chat")
    messages = st.session_state.setdefault("messages", [])
    show_history(messages)
    settings = {"model": card["id"], "thinking": thinking, "thinks_by_default": start["thinking"],
                "tools": tool_schemas(chosen) if chosen else None,
                "temperature": temperature, "top_p": top_p, "max_tokens": int(max_tokens)}
    prompt = st.chat_input("Say something")
    if not prompt:
        return
    if upload is not None:
        st.session_state.uploads += 1
    messages.append(user_message(prompt, upload.getvalue(), upload.type) if upload else user_message(prompt))
    with st.chat_message("user"):
        show_content(messages[-1]["content"])
    with st.chat_message("assistant"):
        try:
            loop = ToolLoop(MAX_TOOL_ROUNDS)  # run each call, show it, feed the result back
            while True:
                reply = stream_reply(args.api, messages, settings)
                messages.append(reply)
                results = loop.step(reply)
                if results is None:
                    break
                for call, result in zip(reply["tool_calls"], results):
                    show_tool_call(call, result["content"])
                messages += results
        except Exception as e:  # the API is down or refused the request: say so on the page
            st.error(f"request failed: {e}")
            st.caption(json.dumps({"api": args.api}))
            return
    if upload is not None:  # draw the page again: the sidebar's uploader (a new key) is empty for the next image
        st.rerun()


if __name__ == "__main__":
    main()
