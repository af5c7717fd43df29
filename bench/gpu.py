"""The CUDA path in one short run: bf16, flash attention, torch.compile, training tokens/s and MFU for
minimind-3, and decode tokens/s. `bash bench/gpu.sh` (or `python bench/gpu.py --device cpu --quick` to try it)."""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from minimind.config import ModelConfig
from minimind.generation import SamplingParams, generate
from minimind.model import MiniMindForCausalLM
from minimind.train.config import TrainConfig
from minimind.train.loop import Dist, batch_flops, make_optimizers, peak_flops, sync, train_step
from minimind.train.pretrain import token_loss


class RawStage:
    loss = staticmethod(token_loss)


def train_speed(model, device, dtype, batch: int, seq: int, steps: int, compile_: bool) -> tuple[float, float]:
    net = torch.compile(model) if compile_ else model
    opt = make_optimizers(model, TrainConfig(lr=1e-4), device)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), device=device)
    step = lambda: train_step(net, model, RawStage, [{"input_ids": ids, "labels": ids}], opt, 1.0, device,  # noqa: E731
                              torch.autocast(device.type, dtype=dtype), None, Dist())[0]
    for _ in range(3):  # warm-up (and compilation)
        loss = step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    return batch * seq * steps / (time.perf_counter() - start), loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script itself")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    preset, batch, seq, steps, new = ("tiny", 2, 64, 2, 8) if args.quick else ("minimind-3", 16, 1024, 10, 256)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.preset(preset)).to(device)

    # Flash attention must accept our attention call as the model makes it (GQA, causal, bf16).
    if device.type == "cuda":
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=dtype):
            model(torch.randint(3, 6400, (2, 128), device=device))
        print("flash attention: ok")

    peak = peak_flops(device, dtype)
    fpt = batch_flops(model.config, [seq], seq) / seq  # per token of a full row, head everywhere
    for compile_ in (False, True):
        tps, loss = train_speed(model, device, dtype, batch, seq, steps, compile_)
        print(f"train {preset} bf16{' + compile' if compile_ else ''}: {tps:,.0f} tokens/s, MFU {tps * fpt / peak:.2f} "
              f"of the measured {peak / 1e12:.1f} TFLOP/s matmul rate, loss {loss:.3f}")

    model.eval()
    model.config.eos_token_id = -1  # decode exactly `new` tokens
    for b in (1, 64):
        prompts = torch.randint(3, 6400, (b, 128)).tolist()
        generate(model, None, prompts, SamplingParams(max_new_tokens=4, temperature=0))
        sync(device)
        start = time.perf_counter()
        generate(model, None, prompts, SamplingParams(max_new_tokens=new, temperature=0))
        sync(device)
        print(f"decode {preset} batch {b}: {b * new / (time.perf_counter() - start):,.0f} tokens/s (fp32 weights)")


if __name__ == "__main__":
    main()
