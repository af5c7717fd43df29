"""Image data: placeholders to pads, the loss mask, preprocessing numbers, MiniMind-V's Parquet and JSONL
readers on good and bad rows, the dataset and collator, and the built-in image generator."""

import ast
import base64
import io
import itertools
import json
import os
import random
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from minimind import MiniMindError, cli
from minimind.chat import encode_chat
from minimind.data import images as gen
from minimind.data import vision
from minimind.data.tasks import split_of
from minimind.data.vision import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_PAD_ID,
    IMAGE_TOKENS,
    VisionDataset,
    check_vision,
    collate_vision,
    encode_vision,
    iter_vision,
    load_image,
    parse_vision_row,
    preprocess,
    processor_spec,
    write_vision_parquet,
)


def solid(colour, size=(12, 10)) -> Image.Image:
    return Image.new("RGB", size, colour)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def chat(user: str, reply: str = "Red.") -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def runs(ids: list[int], token: int) -> list[int]:
    """Lengths of the runs of `token` in ids."""
    return [len(list(group)) for t, group in itertools.groupby(ids) if t == token]


# ---------------------------------------------------------------------------------------------- tokens


def test_each_placeholder_becomes_64_pads_and_no_loss(tokenizer):
    row = parse_vision_row(chat("<image>\nWhich is bigger, this <image> or the king?", "The king is."),
                           [encoded(solid("red")), encoded(solid("blue"))])
    ids, mask = encode_vision(tokenizer, row)
    pads = [i for i, t in enumerate(ids) if t == IMAGE_PAD_ID]
    assert len(pads) == 2 * IMAGE_TOKENS and runs(ids, IMAGE_PAD_ID) == [IMAGE_TOKENS] * 2
    assert all(mask[i] == 0 for i in pads)
    # The assistant's tokens and their loss are those of the same conversation without images.
    plain_ids, plain_mask = encode_chat(tokenizer, chat("x", "The king is."))
    assert [t for t, m in zip(ids, mask) if m] == [t for t, m in zip(plain_ids, plain_mask) if m]
    assert sum(mask) == sum(plain_mask) > 0


def test_image_pad_id_is_12_and_required(tokenizer):
    from tokenizers import Tokenizer, models

    assert vision.image_pad_id(tokenizer) == IMAGE_PAD_ID == 12
    with pytest.raises(MiniMindError, match="the tokenizer has no <\\|image_pad\\|> token"):
        vision.image_pad_id(Tokenizer(models.BPE()))


def test_only_a_user_placeholder_makes_pads(tokenizer):
    messages = [{"role": "system", "content": "<image> is a word here"},
                {"role": "user", "content": "<image> and a typed <|image_pad|>"},
                {"role": "assistant", "content": "I see <image>."}]
    ids, _ = encode_chat(tokenizer, messages, image_tokens=IMAGE_TOKENS)
    assert runs(ids, IMAGE_PAD_ID) == [IMAGE_TOKENS]  # the typed pad is text, as is every other <image>
    assert tokenizer.decode(ids).count("<image>") == 2


# ---------------------------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("mean,std", [(vision.SIGLIP_MEAN, vision.SIGLIP_STD), (CLIP_MEAN, CLIP_STD)])
def test_a_known_pixel_maps_to_its_normalised_value(mean, std):
    rgb = (200, 13, 77)
    out = preprocess([solid(rgb, (40, 30))], size=16, mean=mean, std=std)
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.float32
    for c in range(3):
        expected = (rgb[c] / 255 - mean[c]) / std[c]
        assert torch.allclose(out[0, c], torch.full((16, 16), expected), atol=1e-6), c
    assert preprocess([], size=16).shape == (0, 3, 16, 16)


def test_preprocess_equals_transformers_image_processors(tmp_path):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 37, 3), dtype=np.uint8))
    processors = {"siglip": SiglipImageProcessorPil(size={"height": 32, "width": 24}),
                  "clip": CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 28, "width": 26})}
    for name, processor in processors.items():
        processor.save_pretrained(tmp_path / name)
        spec = processor_spec(tmp_path / name)
        ours = preprocess([image], **spec)
        theirs = processor(images=image, return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape, name
        assert (ours - theirs).abs().max() < 1e-5, name
    (tmp_path / "bad.json").write_text(json.dumps({"size": {"longest_edge": 512}}))
    with pytest.raises(MiniMindError, match="bad.json: unsupported 'size'"):
        processor_spec(tmp_path / "bad.json")


def test_load_image_from_every_source(tmp_path):
    image = Image.fromarray(np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3))
    data = encoded(image)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = [data, str(tmp_path / "pics" / "a.png"), b64, f"data:image/png;base64,{b64}", image]
    for src in sources:
        assert np.array_equal(np.asarray(load_image(src)), np.asarray(image))
    assert np.array_equal(np.asarray(load_image("pics/a.png", base_dir=tmp_path)), np.asarray(image))
    rgba = load_image(encoded(Image.new("RGBA", (3, 3), (10, 20, 30, 0))))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(MiniMindError, match="missing.png: no such file"):
        load_image("missing.png", base_dir=tmp_path)
    with pytest.raises(MiniMindError, match="https://x.org/a.png: a remote URL"):
        load_image("https://x.org/a.png")
    with pytest.raises(MiniMindError, match="data URL: not valid base64"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(MiniMindError, match="image bytes: not an image"):
        load_image(b"GIF89a but not really")
    with pytest.raises(MiniMindError, match="image bytes: not a readable image"):
        load_image(data[:-30])
    with pytest.raises(MiniMindError, match="5x6 is over 20 pixels"):  # checked from the header alone
        load_image(data, max_pixels=20)


# ---------------------------------------------------------------------------------------------- readers


def raw_parquet(path, conversations, image_bytes, image_type=None):
    pq.write_table(pa.table({"conversations": pa.array(conversations, pa.string()),
                             "image_bytes": pa.array(image_bytes, image_type or pa.binary())}), path)
    return path


def test_parquet_reader_good_rows(tmp_path):
    red, blue, black = encoded(solid("red"), "JPEG"), encoded(solid("blue")), encoded(Image.new("RGB", (8, 8)))
    single = raw_parquet(tmp_path / "single.parquet",
                         [json.dumps(chat("<image>\nWhat colour?")), json.dumps(chat("Hello!", "Hi."))],
                         [red, black])  # MiniMind-V's text-only row: no placeholder, an 8x8 black image
    rows = list(iter_vision(single))
    assert [n for n, _ in rows] == [1, 2] and [len(r["images"]) for _, r in rows] == [1, 0]
    assert rows[0][1]["images"][0].getpixel((5, 5))[0] > 200 and rows[0][1]["messages"][1]["content"] == "Red."
    multi = raw_parquet(tmp_path / "multi.parquet", [json.dumps(chat("<image> or <image>?", "The first."))],
                        [[red, blue]], pa.list_(pa.binary()))
    [(_, row)] = list(iter_vision(multi))
    assert [im.getpixel((0, 0)) for im in row["images"]][1] == (0, 0, 255)


def test_parquet_reader_names_file_row_and_field(tmp_path):
    red = encoded(solid("red"))
    path = raw_parquet(tmp_path / "bad.parquet", [
        json.dumps(chat("<image>\nok")),
        '[{"role": "user", "content": "<image>"',  # truncated JSON
        json.dumps(chat("<image> and <image>?")),  # two placeholders, one image
        json.dumps(chat("<image>?")),
        json.dumps(chat("no placeholder")),  # a real image, not MiniMind-V's 8x8 stand-in
        json.dumps([{"role": "assistant", "content": "hi"}]),
    ], [red, red, red, b"\x89PNG\r\n\x1a\n broken", red, red])
    bad = []
    good = [n for n, _ in iter_vision(path, bad)]
    assert good == [1]
    text = [str(b) for b in bad]
    assert text[0].startswith(f"{path}:2: 'conversations' is a string but not valid JSON")
    assert text[1] == f"{path}:3: 2 <image> placeholders in the user turns but 1 image in 'image_bytes'"
    assert text[2].startswith(f"{path}:4: image_bytes: image bytes: not an image")
    assert text[3] == f"{path}:5: 0 <image> placeholders in the user turns but 1 image in 'image_bytes'"
    assert text[4].startswith(f"{path}:6: message 0: assistant turn as the first turn")
    with pytest.raises(MiniMindError, match=f"^{re.escape(str(path))}:2: "):
        list(iter_vision(path))
    pq.write_table(pa.table({"messages": ["[]"]}), tmp_path / "foreign.parquet")
    with pytest.raises(MiniMindError, match="no column 'conversations', 'image_bytes'.*this one has messages"):
        list(iter_vision(tmp_path / "foreign.parquet"))


def test_jsonl_reader_paths_base64_and_bad_rows(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(encoded(solid("red")))
    b64 = base64.b64encode(encoded(solid("blue"))).decode()
    lines = [
        {"conversations": chat("<image> vs <image>"), "images": ["img/red.png", f"data:image/png;base64,{b64}"]},
        {"messages": chat("<image>"), "images": b64},
        {"conversations": chat("text only")},
        {"conversations": chat("<image>"), "images": ["img/none.png"]},
        {"conversations": chat("<image>"), "images": [3]},
        {"conversations": chat("<image>")},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines[:3]) + "\n\n"
                    + "\n".join(json.dumps(r) for r in lines[3:]) + "\n{broken\n")
    bad = []
    rows = dict(iter_vision(path, bad))
    assert sorted(rows) == [1, 2, 3]
    assert [im.getpixel((0, 0)) for im in rows[1]["images"]] == [(255, 0, 0), (0, 0, 255)]
    assert len(rows[2]["images"]) == 1 and rows[3]["images"] == []
    assert [str(b) for b in bad] == [
        f"{path}:5: images[0]: {tmp_path / 'img' / 'none.png'}: no such file",
        f"{path}:6: 'images' must hold strings (paths, base64 or data URLs)",
        f"{path}:7: 1 <image> placeholder in the user turns but 0 images in 'images'",
        f"{path}:8: invalid JSON: Expecting property name enclosed in double quotes at column 2",
    ]


def test_image_rows_longer_than_seq_len_are_bad(tmp_path, tokenizer):
    red = encoded(solid("red"))
    path = raw_parquet(tmp_path / "long.parquet",
                       [json.dumps(chat("<image>\nWhat?")), json.dumps(chat("<image>" * 3 + "\nWhat?")),
                        json.dumps(chat("Hello there. " * 40)), json.dumps(chat("no image"))],
                       [[red], [red] * 3, [], []], pa.list_(pa.binary()))
    report = check_vision(path, tokenizer, seq_len=150)
    assert report.rows == 3 and report.n_bad == 1
    assert re.fullmatch(rf"{re.escape(str(path))}:2: \d+ tokens with its 3 image\(s\) of 64 tokens each, "
                        r"over seq_len 150", str(report.bad[0]))
    # The dataset finds it when opened, from the text alone; with skip_bad it leaves the row out.
    with pytest.raises(MiniMindError, match=f"^{re.escape(str(path))}:2: .* over seq_len 150"):
        VisionDataset(path, tokenizer, seq_len=150)
    ds = VisionDataset(path, tokenizer, seq_len=150, skip_bad=True)
    assert len(ds) == 3 and ds.stats.skipped_bad == 1 and ds.stats.truncated == 1
    assert len(ds[1][0]) == 150 and ds.lengths().tolist() == [len(ds[i][0]) for i in range(3)]
    assert ds.loss_tokens_per_row().tolist() == [int(ds[i][1].sum()) for i in range(3)]
    assert ds.loss_tokens_per_row()[1] == 0 and ds.stats.no_loss_rows == 1  # the cut row lost its answer
    assert ds.stats.tokens == sum(ds.lengths())


def test_dataset_index_is_cached_by_file_tokenizer_and_settings(tmp_path, tokenizer, monkeypatch):
    red = encoded(solid("red"))
    path = raw_parquet(tmp_path / "c.parquet", [json.dumps(chat("<image>\nWhat?")), json.dumps(chat("<image>" * 3))],
                       [[red], [red] * 3], pa.list_(pa.binary()))
    cache = tmp_path / "cache"
    first = VisionDataset(path, tokenizer, seq_len=150, skip_bad=True, cache_dir=cache)
    assert len(first) == 1 and first.stats.skipped_bad == 1 and len(list(cache.glob("*.npz"))) == 1

    def no_scan(self, skip_bad):
        raise AssertionError("scanned again")

    with monkeypatch.context() as m:
        m.setattr(VisionDataset, "_index", no_scan)
        again = VisionDataset(path, tokenizer, seq_len=150, skip_bad=True, cache_dir=cache)
        assert again.numbers.tolist() == [1] and again.stats == first.stats
        assert torch.equal(again[0][2], first[0][2])
        for changed in ({"seq_len": 300}, {"seq_len": 150, "skip_bad": False}, {"seq_len": 150, "newline_loss": True}):
            with pytest.raises(AssertionError, match="scanned again"):
                VisionDataset(path, tokenizer, cache_dir=cache, **changed)
    with pytest.raises(MiniMindError, match=":2: .* over seq_len 150"):  # skip_bad's cache hides nothing
        VisionDataset(path, tokenizer, seq_len=150, cache_dir=cache)
    raw_parquet(path, [json.dumps(chat("<image>\nWhat is the king?"))], [[red]], pa.list_(pa.binary()))
    rewritten = VisionDataset(path, tokenizer, seq_len=150, cache_dir=cache)  # a new file: scanned anew
    assert rewritten.lengths()[0] == len(rewritten[0][0]) > first.lengths()[0]


def test_dataset_names_the_row_of_an_image_that_does_not_decode(tmp_path, tokenizer):
    path = raw_parquet(tmp_path / "broken.parquet", [json.dumps(chat("<image>?"))] * 2,
                       [encoded(solid("red")), b"\xff\xd8\xff not a jpeg"])
    ds = VisionDataset(path, tokenizer, seq_len=256)  # opening reads no image
    assert ds[0][2].shape == (1, 3, 256, 256)
    with pytest.raises(MiniMindError, match=f"^{re.escape(str(path))}:2: image_bytes: image bytes: not an image"):
        ds[1]


# ---------------------------------------------------------------------------------------------- batches


def test_dataset_and_collator_make_the_contract_batch(tmp_path, tokenizer, monkeypatch):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    rows = [{"conversations": chat("<image><image>\nWhich?", "The first."), "images": [colours[0], colours[1]]},
            {"conversations": chat("What is 3 + 4?", "7."), "images": []},
            {"conversations": chat("Colour? <image>", "Blue."), "images": [colours[2]]},
            {"conversations": chat("<image>", "Yellow."), "images": [colours[3]]}]
    for r in rows:
        r["images"] = [encoded(solid(c)) for c in r["images"]]
    monkeypatch.setattr(vision, "ROW_GROUP_ROWS", 3)  # two row groups: the dataset finds rows across them
    path = tmp_path / "set.parquet"
    write_vision_parquet(path, rows)
    assert pq.ParquetFile(path).num_row_groups == 2
    assert pq.read_schema(path).field("image_bytes").type == pa.list_(pa.binary())
    ds = VisionDataset(path, tokenizer, seq_len=256, image_spec={"size": 8})
    assert len(ds) == 4
    batch = collate_vision([ds[i] for i in range(4)])
    counts = torch.tensor([2, 0, 1, 1])
    assert torch.equal(batch["image_counts"], counts)
    ids, labels, pixels = batch["input_ids"], batch["labels"], batch["pixel_values"]
    assert pixels.shape == (4, 3, 8, 8)
    # Images in order of appearance, row by row: each equals its colour, normalised.
    expected = preprocess([solid(c) for c in colours], size=8)
    assert torch.equal(pixels, expected)
    assert torch.equal((ids == IMAGE_PAD_ID).sum(1), IMAGE_TOKENS * counts)
    assert not ((ids == IMAGE_PAD_ID) & (labels != -100)).any()
    target = labels != -100
    assert torch.equal(labels[target], ids[target]) and target.sum(1).min() > 0
    for b in range(4):  # right-padded with 0, no loss on padding
        n = len(ds[b][0])
        assert (ids[b, n:] == 0).all() and (labels[b, n:] == -100).all()
        assert torch.equal(ids[b, :n], torch.from_numpy(ds[b][0]))

    jsonl = tmp_path / "set.jsonl"
    (tmp_path / "red.png").write_bytes(rows[2]["images"][0])
    jsonl.write_text("\n" + json.dumps({"conversations": rows[2]["conversations"], "images": ["red.png"]}) + "\n")
    ids_j, mask_j, pix_j = VisionDataset(jsonl, tokenizer, seq_len=256, image_spec={"size": 8})[0]
    assert np.array_equal(ids_j, ds[2][0]) and np.array_equal(mask_j, ds[2][1]) and torch.equal(pix_j, ds[2][2])


# ---------------------------------------------------------------------------------------------- built-in


def test_generator_is_deterministic_with_a_disjoint_heldout_split():
    a = gen.make_vision(70, seed=3, size=32)
    assert a == gen.make_vision(70, seed=3, size=32)
    assert a != gen.make_vision(70, seed=4, size=32)
    held = gen.make_vision(70, seed=3, size=32, split="heldout")
    train_keys, held_keys = {r["key"] for r in a}, {r["key"] for r in held}
    assert not train_keys & held_keys
    assert {split_of(ast.literal_eval(k)) for k in held_keys} == {"heldout"}
    assert {split_of(ast.literal_eval(k)) for k in train_keys} == {"train"}
    kinds = {r["kind"] for r in a}
    assert kinds == set(gen.KINDS) and {r["lang"] for r in a} == {"en", "zh"}
    captions = gen.make_vision(20, seed=3, size=32, captions=True)
    assert {r["kind"] for r in captions} == {"caption"} and not {r["key"] for r in captions} & held_keys


def named_objects(question: str, lang: str) -> list[tuple[str, str]]:
    """The (shape, colour) pairs a question names, in the order it names them."""
    names = {gen.Obj(shape, colour, 0, 0).name(lang): (shape, colour) for shape in gen.SHAPES for colour in gen.COLOURS}
    found = [(question.find(n), n) for n in names if n in question]
    return [names[n] for _, n in sorted(found)]


def test_generated_answers_match_the_pixels_and_the_checker():
    size = 96
    rows = gen.make_vision(280, seed=1, size=size)
    checked = {}
    for r in rows:
        kind, lang, answer = r["kind"], r["lang"], r["answer"]
        reply, question = r["conversations"][1]["content"], r["conversations"][0]["content"]
        assert gen.is_correct(r, reply), (kind, reply)
        if kind in gen.OPTIONS:
            wrong = next(o for o in gen.OPTIONS[kind][lang] if o != answer)
            assert not gen.is_correct(r, reply.replace(answer, wrong).replace(answer.capitalize(), wrong))
        pixels = np.asarray(Image.open(io.BytesIO(r["images"][0]))).astype(int)
        ink = (pixels != 255).any(-1)
        colours, counts = np.unique(pixels[ink], axis=0, return_counts=True)
        first = gen.OPTIONS.get(kind, {}).get(lang, ("",))[0]
        if kind == "colour":  # the one shape is drawn in the colour the answer names
            name = next(k for k in gen.COLOURS if gen.NAMES[lang][k] == answer)
            assert tuple(colours[counts.argmax()]) == gen.COLOURS[name]
        elif kind == "count":  # shapes keep to their cells: count the cells with ink near their centre
            cell, near = size / gen.GRID, 0.12 * size / gen.GRID
            centres = [((i + 0.5) * cell, (j + 0.5) * cell) for j in range(gen.GRID) for i in range(gen.GRID)]
            found = sum(ink[int(y - near):int(y + near), int(x - near):int(x + near)].any() for x, y in centres)
            assert str(found) == answer
        elif kind in ("position", "size"):  # where and how much of each named shape's colour there is
            (_, a), (_, b) = named_objects(question, lang)
            if a == b:
                continue
            where = [np.argwhere((pixels == gen.COLOURS[c]).all(-1)) for c in (a, b)]
            if kind == "position":
                assert (where[0][:, 1].mean() < where[1][:, 1].mean()) == (answer == first)
            else:
                assert (len(where[0]) > 1.5 * len(where[1])) == (answer == first)
                assert max(len(where[0]), len(where[1])) > 1.5 * min(len(where[0]), len(where[1]))
        elif kind == "chart":  # the bar whose column of bar-coloured pixels is tallest
            heights = (pixels == colours[counts.argmax()]).all(-1).sum(0)
            margin = int(0.08 * size)
            slots = np.array_split(heights[margin:size - margin], len(ast.literal_eval(r["key"])[1]))
            assert "ABCDE"[int(np.argmax([s.max() for s in slots]))] == answer
        else:
            continue
        checked[kind] = checked.get(kind, 0) + 1
    assert set(checked) == {"colour", "count", "position", "size", "chart"} and min(checked.values()) >= 20
    assert gen.is_correct({"kind": "read", "lang": "en", "answer": "42"}, 'It says "42".')
    assert not gen.is_correct({"kind": "read", "lang": "en", "answer": "42"}, "It says 421.")
    assert gen.is_correct({"kind": "chart", "lang": "en", "answer": "C"}, "Bar C.")
    assert not gen.is_correct({"kind": "chart", "lang": "en", "answer": "B"}, "Bar C.")
    assert not gen.is_correct({"kind": "size", "lang": "zh", "answer": "大"}, "小。")


def test_cli_writes_builtin_sets_the_reader_and_check_accept(tmp_path, tokenizer, capsys):
    out = tmp_path / "data"
    assert cli.main(["data", "builtin", "--vision", "--out", str(out), "--image-size", "32", "--vision-sft", "21",
                     "--vision-captions", "7", "--vision-heldout", "14"]) == 0
    printed = capsys.readouterr().out
    assert "vision_sft.parquet: 21 rows" in printed and "vision_heldout.parquet: 14 rows" in printed
    held = pq.read_table(out / "vision_heldout.parquet").to_pylist()
    assert {r["kind"] for r in held} == set(gen.KINDS) and all(r["answer"] for r in held)
    assert pq.read_schema(out / "vision_sft.parquet").field("image_bytes").type == pa.binary()
    rows = list(iter_vision(out / "vision_pretrain.parquet"))
    assert len(rows) == 7 and all(r["images"][0].size == (32, 32) for _, r in rows)
    tokenizer.save_pretrained(tmp_path / "tok")
    assert cli.main(["data", "check", str(out / "vision_sft.parquet"), "--tokenizer", str(tmp_path / "tok"),
                     "--seq-len", "512"]) == 0
    assert "vision, 21 valid rows, 0 bad lines" in capsys.readouterr().out
    with pytest.raises(SystemExit) as failed:  # a bad row: listed, and exit status 1
        cli.main(["data", "check", str(out / "vision_sft.parquet"), "--tokenizer", str(tmp_path / "tok"),
                  "--seq-len", "64"])
    assert failed.value.code == 1 and "vision_sft.parquet:1: " in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- upstream

MINIMIND_V = Path(os.environ.get("MINIMIND_V_REPO", "/work/.mirror/jingyaogong+minimind-v/repo"))
MINIMIND_V_COMMIT = "9595617"  # the MiniMind-V commit this comparison was written against


@pytest.mark.upstream
def test_minimind_v_dataset_code_reads_our_parquet_as_we_do(tmp_path, monkeypatch):
    """MiniMind-V's own VLMDataset (its dataset/lm_dataset.py, with its tokenizer and a SigLIP image processor)
    on our built-in Parquet and on hand-made rows (two images, several turns, a system prompt, a text-only row
    with its 8x8 stand-in) gives our ids, our labels (newline_loss, MiniMind's mask) and our pixels."""
    if not (MINIMIND_V / "HEAD").is_file() and not (MINIMIND_V / ".git").exists():
        pytest.skip(f"MiniMind-V's repository is not at {MINIMIND_V} (set MINIMIND_V_REPO)")
    from transformers import SiglipImageProcessorPil

    from minimind.tokenizer import load_tokenizer

    for name in ("dataset/__init__.py", "dataset/lm_dataset.py", "model/__init__.py", "model/model_minimind.py",
                 "model/model_vlm.py", "model/tokenizer.json", "model/tokenizer_config.json"):
        blob = subprocess.run(["git", "-C", str(MINIMIND_V), "show", f"{MINIMIND_V_COMMIT}:{name}"],
                              capture_output=True, check=True).stdout
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(blob)
    # Its loader reads Parquet through Hugging Face `datasets` (not installed here): the same rows via pyarrow.
    stub = types.ModuleType("datasets")
    stub.Dataset = types.SimpleNamespace(from_parquet=lambda p: pq.read_table(p, columns=list(vision.COLUMNS))
                                         .to_pylist())
    monkeypatch.setitem(sys.modules, "datasets", stub)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # it sets this on import
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    try:
        from dataset.lm_dataset import VLMDataset
    finally:  # its top-level `model` and `dataset` packages must not outlive the test
        for name in set(sys.modules) - before:
            del sys.modules[name]
    monkeypatch.setattr(random, "random", lambda: 0.2)  # its augmentations off: no system prompt added, think kept

    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "processor")
    theirs_tok = load_tokenizer(tmp_path / "model")
    gen_path = tmp_path / "builtin.parquet"
    write_vision_parquet(gen_path, gen.make_vision(28, seed=0, size=40))
    jpeg = {c: encoded(solid(c, (20, 20)), "JPEG") for c in ("red", "blue", "green", "yellow")}
    mixed = [
        {"conversations": chat("<image>\n<image>\n哪张是红色的？", "第一张。"), "images": [jpeg["red"], jpeg["blue"]]},
        {"conversations": chat("你好", "你好！"), "images": [encoded(Image.new("RGB", (8, 8)), "JPEG")]},
        {"conversations": [{"role": "system", "content": "You are minimind."},
                           {"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "Green."},
                           {"role": "user", "content": "And <image>?"}, {"role": "assistant", "content": "Yellow."}],
         "images": [jpeg["green"], jpeg["yellow"]]},
    ]
    mixed_path = tmp_path / "mixed.parquet"
    write_vision_parquet(mixed_path, mixed)
    for path, n_rows in ((gen_path, 28), (mixed_path, 3)):
        upstream = VLMDataset(str(path), theirs_tok, preprocess=processor, max_length=300)
        ours = VisionDataset(path, theirs_tok, seq_len=300, image_spec=processor_spec(tmp_path / "processor"),
                             newline_loss=True)
        assert len(ours) == len(upstream) == n_rows
        for i in range(n_rows):
            ids_u, labels_u, pixels_u = upstream[i]
            ids, mask, pixels = ours[i]
            n = len(ids)
            assert ids_u[:n].tolist() == ids.tolist() and (ids_u[n:] == theirs_tok.pad_token_id).all(), (path, i)
            assert labels_u[:n].tolist() == np.where(mask.astype(bool), ids, -100).tolist(), (path, i)
            assert (labels_u[n:] == -100).all()
            if len(pixels):  # its text-only row still carries the stand-in image, which no pad takes
                assert (pixels_u["pixel_values"].reshape(pixels.shape) - pixels).abs().max() < 1e-5, (path, i)


def test_scene_labels_name_each_object_left_to_right_and_bad_keys_name_the_row(tmp_path):
    assert list(gen.SCENE_LABELS) == ["count", "shape", "colour", "size", "column", "row", "shape2", "colour2", "size2",
                                      "column2", "row2"]
    two = gen.Scene((gen.Obj("triangle", "blue", cell=5, size=0), gen.Obj("circle", "red", cell=3, size=2)))
    assert gen.scene_labels(two) == [1, 0, 0, 2, 0, 1, 2, 2, 0, 2, 1]  # the red circle is left (column 0, row 1)
    one = gen.Scene((gen.Obj("square", "green", cell=7, size=1),))
    assert gen.scene_labels(one) == [0, 1, 1, 1, 1, 2] + [gen.NO_LABEL] * 5
    many = gen.Scene(tuple(gen.Obj("circle", "orange", cell=c, size=c % 3) for c in (8, 1, 6)))
    assert gen.scene_labels(many) == [2, 0, 5, 0, 0, 2] + [gen.NO_LABEL] * 5  # cell 6 is left-most
    assert gen.scene_of_key(repr(two.key)).key == two.key
    rows = gen.make_vision(6, seed=0, kinds=["shape", "count", "position"])
    write_vision_parquet(tmp_path / "ok.parquet", rows)
    ds = gen.SceneDataset(tmp_path / "ok.parquet", {"size": 32}, image_tokens=16)
    assert len(ds) == 6 and ds.stats.tokens == 96 and ds[0][0].shape == (1, 3, 32, 32)
    assert ds.labels.tolist() == [gen.scene_labels(gen.scene_of_key(r["key"])) for r in rows]
    write_vision_parquet(tmp_path / "bad.parquet", rows[:2] + gen.make_vision(1, seed=0, kinds=["read"]))
    with pytest.raises(MiniMindError, match=r"bad\.parquet:3: key .* is not a scene of objects"):
        gen.SceneDataset(tmp_path / "bad.parquet", {"size": 32}, image_tokens=16)
