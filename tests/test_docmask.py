"""Document masking in packed pretraining (`doc_mask`): each document in a packed row gets the logits it gets
alone, the setting trains, is recorded and resumes exactly."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import CORPUS, small_model
from safetensors.torch import load_file

from minimind.data.pack import pack
from minimind.model import document_positions
from minimind.tokenizer import save_tokenizer
from minimind.train.config import TrainConfig, load_config
from minimind.train.loop import train
from minimind.train.pretrain import PretrainStage, token_loss
from minimind.train.sft import SFTStage


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("docmask")
    # Short documents of different lengths, so rows hold several and rows cut them anywhere.
    lines = [json.dumps({"text": f"{i}: {CORPUS[i % 4][: 2 + i % 9]}"}, ensure_ascii=False) for i in range(120)]
    (d / "pretrain.jsonl").write_text("\n".join(lines) + "\n")
    save_tokenizer(tokenizer, d / "tok")
    return d


def rows(corpus, tokenizer, seq_len=48, n=4):
    data = pack(corpus / "pretrain.jsonl", tokenizer, "pretrain", seq_len, workers=1, progress=False)
    return [data[i] for i in range(n)]


def test_document_positions_restart_at_each_document():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 6]])
    assert document_positions(ids).tolist() == [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 0]]


def test_collate_splits_rows_at_each_bos(corpus, tokenizer):
    stage = PretrainStage(TrainConfig(doc_mask=True), tokenizer)
    batch = stage.collate(rows(corpus, tokenizer))
    ids, docs = batch["input_ids"], batch["document_ids"]
    bos, eos = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    for row, doc in zip(ids.tolist(), docs.tolist()):
        starts = [i for i, t in enumerate(row) if t == bos]
        assert len(starts) >= 2  # short documents: every row holds several
        assert doc == [sum(s <= i for s in starts) for i in range(len(row))]
        # the packer's layout: each document ends with eos just before the next one's bos
        assert all(row[s - 1] == eos for s in starts if s)
    assert "document_ids" not in PretrainStage(TrainConfig(doc_mask=False), tokenizer).collate(rows(corpus, tokenizer))


@pytest.mark.parametrize("grad", [False, True], ids=["sdpa", "blocked"])
def test_each_document_in_a_packed_row_gets_its_logits_alone(family, corpus, tokenizer, grad):
    # With grad on a CPU the model trains through blocked_attention, without it through SDPA: both take the mask.
    model = small_model(family, vocab_size=len(tokenizer)).train()
    batch = PretrainStage(TrainConfig(doc_mask=True), tokenizer).collate(rows(corpus, tokenizer))
    ids, docs = batch["input_ids"], batch["document_ids"]
    with torch.set_grad_enabled(grad):
        packed = model(ids, document_ids=docs).logits
        crossing = model(ids).logits
        worst = crossed = 0.0
        for b in range(len(ids)):
            for d in docs[b].unique():
                span = (docs[b] == d).nonzero().flatten()
                alone = model(ids[b:b + 1, span]).logits[0]
                worst = max(worst, (packed[b, span] - alone).abs().max().item())
                crossed = max(crossed, (crossing[b, span] - alone).abs().max().item())
    assert worst < 1e-5
    assert crossed > 1e-2  # without the mask, later documents see the earlier ones (so the check can fail)


def test_document_ids_refuse_a_kv_cache():
    model = small_model("qwen3")
    with pytest.raises(ValueError, match="document_ids .* KV cache"):
        model(torch.ones(1, 4, dtype=torch.long), document_ids=torch.zeros(1, 4, dtype=torch.long),
              cache=model.new_cache(1, 8))


def test_doc_mask_is_on_by_default_and_leaves_sft_rows_whole(corpus, tokenizer):
    assert TrainConfig().doc_mask and not load_config(None, ["--no-doc-mask"]).doc_mask
    row = np.array(tokenizer.convert_tokens_to_ids(["<|im_start|>", "user", "<|im_end|>", "<|im_start|>"]))
    batch = SFTStage(TrainConfig(stage="sft"), tokenizer).collate([(row, np.ones(len(row), dtype=np.uint8))])
    assert "document_ids" not in batch  # an SFT row is one conversation, each of whose turns opens with a bos


def test_the_mask_changes_the_loss(corpus, tokenizer):
    model = small_model("qwen3", vocab_size=len(tokenizer))
    batch = PretrainStage(TrainConfig(doc_mask=True), tokenizer).collate(rows(corpus, tokenizer))
    with torch.no_grad():
        masked, n, _ = token_loss(model, batch)
        plain, m, _ = token_loss(model, {k: v for k, v in batch.items() if k != "document_ids"})
    assert n == m == 4 * 47
    assert abs(float(masked) - float(plain)) > 1e-3 * float(plain)


def test_training_with_doc_mask_learns_records_the_setting_and_resumes_exactly(corpus, tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    flags = ["--data", str(corpus / "pretrain.jsonl"), "--tokenizer", str(corpus / "tok"), "--out", str(run),
             "--seq-len", "48", "--batch-size", "4", "--steps", "24", "--lr", "3e-3", "--warmup-steps", "2",
             "--log-every", "1", "--no-progress", "--threads", "1", "--workers", "1", "--dtype", "float32",
             "--save-every", "12", "--doc-mask"]
    cfg = load_config(None, flags, stage="pretrain")
    assert cfg.doc_mask
    train(cfg, PretrainStage)
    assert "doc_mask = true" in (run / "config.toml").read_text().splitlines()
    curve = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(curve) == 24 and np.mean(curve[-4:]) < 0.7 * np.mean(curve[:4])
    straight = load_file(run / "model" / "model.safetensors")

    # Back to step 12, as after a kill there: steps 13-24 run again from the checkpoint and give the same weights.
    shutil.rmtree(checkpoints / "step_24")
    (checkpoints / "latest").write_text("step_12\n")
    train(load_config(None, [*flags, "--resume"], stage="pretrain"), PretrainStage)
    resumed = load_file(run / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
