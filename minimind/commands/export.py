"""`minimind export gguf|ollama|lfm2-vl` (a model directory out to llama.cpp / Ollama / transformers' LFM2-VL) and
`minimind import` (weights in from transformers or MiniMind's .pth).
`minimind export gguf --model runs/x/model --out x.gguf --type q8_0`."""

from __future__ import annotations

import argparse
from pathlib import Path

from minimind.commands.flags import add_rope_scaling_flag
from minimind.config import PRESETS, ModelConfig
from minimind.importer import CONFIG_FLAGS, DTYPE_NAMES, import_model
from minimind.vision.config import read_vision_config


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:,.1f} MB"


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from minimind.export.gguf import export_gguf, read_gguf

    out = export_gguf(args.model, args.out, args.type, args.name)
    meta, tensors, types = read_gguf(out)  # read it back: a file we cannot read is not worth announcing
    print(f"wrote {out}: {meta['general.architecture']}, {len(tensors)} tensors "
          f"({', '.join(sorted(set(types.values())))}), {len(meta['tokenizer.ggml.tokens'])} tokens, {_size(out)}")
    print(f"run it: llama-cli -m {out}   (quantised files on AMX CPUs: add --repack 0)")
    if read_vision_config(args.model) is not None:
        print("this is the vision model's decoder alone: llama.cpp's mtmd has no projector that computes ours, so no "
              "mmproj file is written (README: Vision)")


def cmd_export_ollama(args: argparse.Namespace) -> None:
    from minimind.export.ollama import export_ollama

    gguf_file, modelfile, command = export_ollama(args.model, args.out, args.type, args.name)
    print(f"wrote {gguf_file} ({_size(gguf_file)}) and {modelfile}")
    print(f"create the Ollama model with:\n  {command}")


def cmd_export_lfm2_vl(args: argparse.Namespace) -> None:
    from minimind.export.lfm2_vl import export_lfm2_vl

    out = export_lfm2_vl(args.model, args.out)
    print(f"wrote {out}: Lfm2VlForConditionalGeneration (SigLIP tower, no remote code); load it with "
          "transformers.AutoModelForImageTextToText.from_pretrained")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `export` and `import`."""
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

    p = export.add_parser("lfm2-vl", help="write a vision model as a transformers LFM2-VL directory (no remote code)",
                          description="The same logits in transformers' Lfm2VlForConditionalGeneration: our SigLIP "
                          "tower, projector and decoder (minimind/export/lfm2_vl.py says why LFM2-VL, not LLaVA).")
    p.add_argument("--model", required=True, help="vision model directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_export_lfm2_vl)
    add_import_parser(sub)


def cmd_import(args: argparse.Namespace) -> None:
    overrides = {k: getattr(args, k) for k in CONFIG_FLAGS}
    if args.use_moe is not None:
        overrides["use_moe"] = bool(args.use_moe)
    out = import_model(args.src, args.out, tokenizer=args.tokenizer, preset=args.preset, dtype=args.dtype,
                       rope_scaling=args.rope_scaling, vision_encoder=args.vision_encoder, **overrides)
    cfg = ModelConfig.load(out)
    vision = ", plus a vision encoder and projector" if args.vision_encoder else ""
    print(f"imported {args.src} -> {out}: {cfg.model_type}, {cfg.num_parameters():,} parameters "
          f"(d={cfg.hidden_size}, {cfg.num_hidden_layers} layers" + (f", {cfg.num_experts} experts" if cfg.use_moe
                                                                     else "") + ")" + vision)


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import a transformers directory or a MiniMind .pth into a model directory",
                       description="SRC is a transformers model directory (qwen3, qwen3_moe, qwen2_moe, llama, or "
                       "MiniMind's model_type=minimind export; e.g. a download of jingyaogong/minimind-3) or "
                       "MiniMind's native state dict (full_sft_768.pth). For a .pth the shapes come from --preset, "
                       "then from the weights, then from the flags below. MiniMind2's weights need MiniMind2's own "
                       "tokenizer (--tokenizer): it has no think or tool tokens, and selects MiniMind2's chat format.")
    p.add_argument("src", help="transformers model directory or .pth file")
    p.add_argument("--out", required=True, help="output model directory (written atomically)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (required when SRC has no tokenizer.json)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="convert the weights (default: as stored)")
    p.add_argument("--vision-encoder", default=None, help="MiniMind-V's .pth only: the transformers directory of its "
                   "vision encoder (SigLIP or CLIP, e.g. siglip2-base-p32-256-ve), whose weights the .pth leaves out")
    add_rope_scaling_flag(p, "the RoPE scaling written to config.json, for SRC of either kind")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help=".pth only: base config (default: minimind-3, or minimind2/-small/-moe without q/k-norm)")
    for name in CONFIG_FLAGS:
        if name == "use_moe":
            p.add_argument("--use-moe", "--use_moe", dest="use_moe", type=int, choices=[0, 1], default=None,
                           help=".pth only: 1 = MoE (default: detected from the weights)")
            continue
        kind = float if name in ("rope_theta", "rms_norm_eps") else int
        p.add_argument(f"--{name.replace('_', '-')}", f"--{name}", dest=name, type=kind, default=None,
                       help=f".pth only: {name}")
    p.set_defaults(func=cmd_import)
