"""`minimind export gguf|ollama`: the export subcommands, wired into the main CLI by cli.py.
`minimind export gguf --model runs/x/model --out x.gguf --type q8_0`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:,.1f} MB"


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from minimind.export.gguf import export_gguf, read_gguf

    out = export_gguf(args.model, args.out, args.type, args.name)
    meta, tensors, types = read_gguf(out)  # read it back: a file we cannot read is not worth announcing
    print(f"wrote {out}: {meta['general.architecture']}, {len(tensors)} tensors "
          f"({', '.join(sorted(set(types.values())))}), {len(meta['tokenizer.ggml.tokens'])} tokens, {_size(out)}")
    print(f"run it: llama-cli -m {out}   (quantised files on AMX CPUs: add --repack 0)")


def cmd_export_ollama(args: argparse.Namespace) -> None:
    from minimind.export.ollama import export_ollama

    gguf_file, modelfile, command = export_ollama(args.model, args.out, args.type, args.name)
    print(f"wrote {gguf_file} ({_size(gguf_file)}) and {modelfile}")
    print(f"create the Ollama model with:\n  {command}")


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export a model directory to GGUF (llama.cpp) or Ollama").add_subparsers(
        dest="action", required=True, metavar="FORMAT")
    p = export.add_parser("gguf", help="write one GGUF file for llama.cpp")
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="output .gguf file")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"],
                   help="weight storage: f32 (exact), f16 (half the size), q8_0 (8-bit blocks, a quarter)")
    p.add_argument("--name", default=None, help="general.name in the file (default: the model directory's name)")
    p.set_defaults(func=cmd_export_gguf)

    p = export.add_parser("ollama", help="write a GGUF and a Modelfile for `ollama create`")
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="output directory (gets NAME-TYPE.gguf and Modelfile)")
    p.add_argument("--type", default="q8_0", choices=["f32", "f16", "q8_0"], help="weight storage in the GGUF")
    p.add_argument("--name", default=None, help="model name for Ollama (default: the model directory's name)")
    p.set_defaults(func=cmd_export_ollama)
