"""Image data for the vision-language model: images from a path, bytes, base64 or a data URL; preprocessing with
PIL and numpy (torchvision cannot live beside our torch pin); MiniMind-V's Parquet and JSONL rows validated with
file:row errors; a dataset and the batch collator.
`ds = VisionDataset("sft_i2t.parquet", tok, seq_len=768)`; `batch = collate_vision([ds[0], ds[1]])`."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from minimind import MiniMindError
from minimind.chat import IMAGE, IMAGE_PAD, encode_chat
from minimind.data.formats import (
    BadLine,
    CheckReport,
    _CappedList,
    decode_line,
    json_type,
    parse_row,
    token_stats,
)
from minimind.data.pack_workers import PackStats
from minimind.model import MiniMindForCausalLM
from minimind.vision.model import VisionLanguageModel

IMAGE_TOKENS = 64  # <|image_pad|> per image: SigLIP2 p32 at 256x256 gives 8x8 patch features
IMAGE_PAD_ID = 12  # <|image_pad|> in MiniMind's tokenizer and ours (tokenizer.SPECIAL_TOKENS)
IMAGE_SIZE = 256
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# A decoded image may hold at most this many pixels (a small file can expand to gigabytes): 64 megapixels.
MAX_IMAGE_PIXELS = 1 << 26
# MiniMind-V's text-only rows carry an 8x8 black image and no <image> placeholder; such an image is dropped.
PLACEHOLDER_SIDE = 8
COLUMNS = ("conversations", "image_bytes")  # MiniMind-V's Parquet; other columns are left alone
ROW_GROUP_ROWS = 1000  # rows per Parquet row group we write: a reader holds one group of images in memory
INDEX_FORMAT = 1  # of VisionDataset's cached index: a change makes old caches rebuild

_BASE64 = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),(?P<data>.*)", re.DOTALL)


# ---------------------------------------------------------------------------------------------- images


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()).replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise MiniMindError(f"{what}: not valid base64") from None


def load_image(src: Any, base_dir: str | Path | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB image from a PIL image, bytes, a file path (relative ones from `base_dir`), a `data:` URL with
    base64, or bare base64. MiniMindError saying what is wrong: no such file, not base64, not an image, too big."""
    if isinstance(src, Image.Image):
        image, what = src, "image"
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            data, what = bytes(src), "image bytes"
        elif isinstance(src, Path) or isinstance(src, str) and not src.startswith("data:"):
            data, what = _file_or_base64(str(src), base_dir)
        elif isinstance(src, str):
            data, what = data_url_bytes(src), "data URL"
        else:
            raise MiniMindError(f"an image must be a path, bytes or base64 text, got {type(src).__name__}")
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise MiniMindError(f"{what}: not an image (no format PIL reads)") from None
        except Exception as e:  # PIL raises several types for a foreign or damaged file
            raise MiniMindError(f"{what}: not an image ({e})") from None
    if image.width * image.height > max_pixels:  # checked from the header, before decoding
        raise MiniMindError(f"{what}: {image.width}x{image.height} is over {max_pixels:,} pixels")
    try:
        return image.convert("RGB")
    except Exception as e:  # a truncated file fails only when its pixels are decoded
        raise MiniMindError(f"{what}: not a readable image ({e})") from None


def data_url_bytes(url: str, what: str = "data URL") -> bytes:
    """The bytes of a `data:[mime];base64,...` URL (MiniMindError naming `what` if it is not one)."""
    match = _DATA_URL.fullmatch(url)
    if not match or ";base64" not in match["params"]:
        raise MiniMindError(f"{what}: expected data:image/...;base64,...")
    return _b64decode(match["data"], what)


def _file_or_base64(text: str, base_dir: str | Path | None) -> tuple[bytes, str]:
    if re.match(r"(?i)https?://", text):
        raise MiniMindError(f"{text}: a remote URL (images come from files, bytes, base64 or data URLs only)")
    path = Path(base_dir or ".") / text
    try:
        if path.is_file():
            return path.read_bytes(), str(path)
    except OSError:  # a base64 string is no valid file name (too long)
        pass
    # Base64 of any image is longer than a file name and has no dot; a short or dotted name is a missing file.
    if len(text) >= 64 and "." not in text and _BASE64.fullmatch(text):
        return _b64decode(text, "base64 image"), "base64 image"
    raise MiniMindError(f"{path}: no such file")


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def preprocess(images: Iterable[Any], size: int | Sequence[int] = IMAGE_SIZE, mean: Sequence[float] = SIGLIP_MEAN,
               std: Sequence[float] = SIGLIP_STD, resample: int = Image.Resampling.BICUBIC,
               shortest_edge: int | None = None, scale: float = 1 / 255) -> torch.Tensor:
    """Images (anything load_image takes) as one float32 tensor [n, 3, h, w]: each resized to `size` (h, w or
    one side for a square), or, given shortest_edge, its short side resized to that and the centre cropped to
    `size` (CLIP's way); then (pixel * scale - mean) / std per channel, as transformers' image processors do."""
    h, w = _size(size)
    mean32 = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    arrays = [np.empty((0, 3, h, w), dtype=np.float32)]  # so a text-only row still has the batch's shape
    for src in images:
        image = load_image(src)
        if shortest_edge is None:
            image = image.resize((w, h), resample=resample)
        else:
            short, long = sorted(image.size)
            new_long = int(shortest_edge * long / short)
            new = (shortest_edge, new_long) if image.width <= image.height else (new_long, shortest_edge)
            image = image.resize(new, resample=resample)
            top, left = (image.height - h) // 2, (image.width - w) // 2
            image = image.crop((left, top, left + w, top + h))
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * np.float32(scale)
        arrays.append(((pixels - mean32) / std32)[None])
    return torch.from_numpy(np.concatenate(arrays))


def processor_spec(path: str | Path) -> dict:
    """preprocess's keyword arguments from a transformers image processor's preprocessor_config.json (a file or
    the encoder directory holding it): SigLIP's fixed height x width, or CLIP's shortest edge and centre crop."""
    path = Path(path)
    file = path / "preprocessor_config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MiniMindError(f"{file}: no such file (an image encoder directory has its preprocessor_config.json)") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MiniMindError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise MiniMindError(f"{file}: expected a JSON object")
    size, crop = config.get("size"), config.get("crop_size")
    spec: dict[str, Any] = {
        "mean": tuple(config.get("image_mean", SIGLIP_MEAN)) if config.get("do_normalize", True) else (0.0,) * 3,
        "std": tuple(config.get("image_std", SIGLIP_STD)) if config.get("do_normalize", True) else (1.0,) * 3,
        "resample": int(config.get("resample", Image.Resampling.BICUBIC)),
        "scale": float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0,
    }
    if isinstance(size, dict) and "height" in size and "width" in size:
        spec["size"] = (size["height"], size["width"])
    elif (isinstance(size, dict) and "shortest_edge" in size or isinstance(size, int)) and crop is not None \
            and config.get("do_center_crop", True):  # without the crop the size would vary: no fixed input
        spec["size"] = (crop["height"], crop["width"]) if isinstance(crop, dict) else _size(crop)
        spec["shortest_edge"] = size if isinstance(size, int) else size["shortest_edge"]
    else:
        raise MiniMindError(f"{file}: unsupported 'size' {json.dumps(size)} ({config.get('image_processor_type')}); "
                            "expected {height, width} (SigLIP) or {shortest_edge} with crop_size (CLIP)")
    if len(spec["mean"]) != 3 or len(spec["std"]) != 3:
        raise MiniMindError(f"{file}: image_mean and image_std need 3 values (RGB)")
    return spec


# ---------------------------------------------------------------------------------------------- rows


def image_pad_id(tokenizer: Any) -> int:
    """The id `<|image_pad|>` has in this tokenizer (12 in MiniMind's and ours); MiniMindError if it is not one
    token there, as then no image could be placed."""
    ids = tokenizer.encode(IMAGE_PAD, add_special_tokens=False)
    ids = getattr(ids, "ids", ids)  # a raw tokenizers.Tokenizer gives an Encoding
    if len(ids) != 1:
        raise MiniMindError(f"the tokenizer has no {IMAGE_PAD} token (MiniMind's has it at id {IMAGE_PAD_ID}), "
                            "so it cannot take images")
    return ids[0]


def placeholders(messages: list[dict]) -> int:
    """How many `<image>` the user turns hold: the images a row must carry (only user turns take images)."""
    return sum(m["content"].count(IMAGE) for m in messages if m["role"] == "user")


def _image_list(value: Any, field: str) -> list[tuple[str, Any]]:
    """A row's images as (field name for errors, source): None, one value, or a list of them."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [(f"{field}[{k}]", v) for k, v in enumerate(value)]
    return [(field, value)]


def parse_vision_row(conversations: Any, images: Any, field: str = "images", tools: Any = None,
                     base_dir: str | Path | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                     decode: bool = True) -> dict:
    """One row's {"messages", "tools", "images" (RGB PIL images, in order of appearance)} or ValueError naming
    the field: conversations (a list, or MiniMind-V's JSON string) as for SFT; one image per `<image>` in the
    user turns; every image decodable. A row with no placeholder and one image of at most 8x8 pixels is
    MiniMind-V's text-only row: its stand-in image is dropped. decode=False: the counts alone are checked (a
    lone image beside no placeholder taken for the stand-in) and "images" holds the sources, undecoded."""
    if isinstance(conversations, str):
        try:
            conversations = json.loads(conversations)
        except json.JSONDecodeError as e:
            raise ValueError(f"'conversations' is a string but not valid JSON ({e.msg} at char {e.pos})") from None
    row = parse_row({"conversations": conversations, **({"tools": tools} if tools is not None else {})}, "sft")
    wanted, sources = placeholders(row["messages"]), _image_list(images, field)
    found = [src for _, src in sources]
    if decode:
        found = []
        for name, src in sources:
            try:
                if isinstance(src, str) and not src:
                    raise MiniMindError("empty")
                found.append(load_image(src, base_dir, max_pixels))
            except MiniMindError as e:
                raise ValueError(f"{name}: {e}") from None
    if wanted == 0 and len(found) == 1 and (not decode or max(found[0].size) <= PLACEHOLDER_SIDE):
        found = []
    if wanted != len(found):
        raise ValueError(f"{wanted} {IMAGE} placeholder{'s' * (wanted != 1)} in the user turns but "
                         f"{len(found)} image{'s' * (len(found) != 1)} in '{field}'")
    return {**row, "images": found}


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MiniMindError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise MiniMindError(f"{path}: no such file") from None
    except Exception as e:  # pyarrow raises several types for a damaged or foreign file
        raise MiniMindError(f"{path}: unreadable Parquet ({e})") from None
    missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise MiniMindError(f"{path}: no column {', '.join(map(repr, missing))} (MiniMind-V's Parquet has "
                            f"conversations and image_bytes; this one has {', '.join(pf.schema_arrow.names)})")
    return pf


def is_parquet(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".parquet"


def _row_group(pf, g: int, images: bool = True) -> list[dict]:
    """Row group g as dicts. images=False: each row's image_bytes is [None] * its image count, from the
    column's lengths, so a scan of the text never makes Python objects of the images."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pf.read_row_group(g, columns=list(COLUMNS))
    if images:
        return table.to_pylist()
    column = table.column("image_bytes")
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        counts = pc.fill_null(pc.list_value_length(column), 0)
    else:
        counts = pc.cast(pc.is_valid(column), pa.int32())
    return [{"conversations": c, "image_bytes": [None] * k}
            for c, k in zip(table.column("conversations").to_pylist(), counts.to_pylist())]


def _raw_rows(path: Path, images: bool = True) -> Iterator[tuple[int, int, Any]]:
    """(number, position, raw row or the ValueError reading it raised) for each row: Parquet rows as dicts of
    its columns, numbered from 1, position the 0-based row; JSONL rows decoded, numbered by line, position the
    line's byte offset (only \\n ends a line, as for formats.read_lines)."""
    if is_parquet(path):
        pf = _parquet_file(path)
        n = 0
        for g in range(pf.num_row_groups):
            for row in _row_group(pf, g, images):
                n += 1
                yield n, n - 1, row
        return
    pos = 0
    with path.open("rb") as fh:
        for line, raw in enumerate(fh, 1):
            start, pos = pos, pos + len(raw)
            if line == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark some editors write
            if raw.strip():
                try:
                    yield line, start, decode_line(raw)
                except ValueError as e:
                    yield line, start, e


def _parse_raw(raw: Any, path: Path, decode: bool = True, max_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    if isinstance(raw, ValueError):
        raise raw
    if not isinstance(raw, dict):
        raise ValueError(f"row is a {json_type(raw)}, not a JSON object")
    if is_parquet(path):
        return parse_vision_row(raw["conversations"], raw["image_bytes"], "image_bytes", max_pixels=max_pixels,
                                decode=decode)
    images = raw.get("images")
    if images is not None and not isinstance(images, (str, list)):
        raise ValueError(f"'images' must be a path or base64 string or an array of them, got {json_type(images)}")
    if isinstance(images, list) and not all(isinstance(i, str) for i in images):
        raise ValueError("'images' must hold strings (paths, base64 or data URLs)")
    messages = raw.get("conversations", raw.get("messages"))
    if messages is None:
        raise ValueError("missing field 'conversations' (or 'messages')")
    return parse_vision_row(messages, images, "images", raw.get("tools"), path.parent, max_pixels, decode)


def iter_vision(path: str | Path, bad: list[BadLine] | None = None,
                max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[tuple[int, dict]]:
    """(row number, row) for each row of MiniMind-V's Parquet (conversations, image_bytes; rows numbered from 1)
    or a JSONL file (numbered by line) whose rows carry `images`: paths relative to the file, base64 or data
    URLs. Rows as parse_vision_row gives them. On a bad row: if bad is None raise MiniMindError("file:row:
    problem"), else append its BadLine to bad and go on."""
    path = Path(path)
    if not path.is_file():
        raise MiniMindError(f"{path}: no such file")
    for n, _, raw in _raw_rows(path):
        try:
            yield n, _parse_raw(raw, path, max_pixels=max_pixels)
        except ValueError as e:
            problem = BadLine(str(path), n, str(e))
            if bad is None:
                raise MiniMindError(str(problem)) from None
            bad.append(problem)


def encode_vision(tokenizer: Any, row: dict, seq_len: int | None = None, image_tokens: int = IMAGE_TOKENS,
                  newline_loss: bool = False) -> tuple[list[int], list[int]]:
    """Ids and loss mask of a parsed row, each `<image>` as `image_tokens` pads, whole. ValueError if a row with
    images is longer than seq_len: cutting it could cut an image (a text-only row is the caller's to cut)."""
    ids, mask = encode_chat(tokenizer, row["messages"], row.get("tools"), newline_loss=newline_loss,
                            image_tokens=image_tokens)
    if seq_len is not None and len(ids) > seq_len and row["images"]:
        raise ValueError(f"{len(ids)} tokens with its {len(row['images'])} image(s) of {image_tokens} tokens "
                         f"each, over seq_len {seq_len}")
    return ids, mask


def check_vision(path: str | Path, tokenizer: Any = None, seq_len: int | None = None,
                 image_tokens: int = IMAGE_TOKENS, max_problems: int = 50) -> CheckReport:
    """Validate every row (images decoded; with a tokenizer, also its length against seq_len and token
    statistics): formats.check_file's report, of kind "vision"; format_report prints it."""
    if tokenizer is not None:
        image_pad_id(tokenizer)
    bad = _CappedList(max_problems)
    report, lengths = CheckReport(str(path), "vision"), []
    for n, row in iter_vision(path, bad):
        if tokenizer is not None:
            try:
                lengths.append(len(encode_vision(tokenizer, row, seq_len, image_tokens)[0]))
            except ValueError as e:
                bad.append(BadLine(str(path), n, str(e)))
                continue
        report.rows += 1
    report.bad, report.n_bad, report.tokens = list(bad), bad.count, token_stats(lengths)
    return report


# ---------------------------------------------------------------------------------------------- training


class VisionDataset:
    """The rows of one Parquet or JSONL file for training: item i is (ids int64 [T], loss mask uint8 [T],
    pixel_values float32 [n_images, 3, H, W]); collate_vision batches them.

    Opening it reads the text of every row (not the images): a bad conversation, a placeholder count unlike the
    image count or an image row over seq_len raises MiniMindError naming file and row (with skip_bad, the row
    is left out and counted). Items are read, decoded and encoded on demand; an image that does not decode
    raises then (check_vision decodes them all beforehand). Text-only rows over seq_len are cut, as for SFT.
    `.stats` (PackStats), `.lengths()` and `.loss_tokens_per_row()` serve the training loop. That scan is
    cached (see _cached_index) in cache_dir, by default pack's: $MINIMIND_CACHE or ~/.cache/minimind/packed.
    `image_spec`: preprocess's keyword arguments (processor_spec of the encoder, or size/mean/std)."""

    def __init__(self, path: str | Path, tokenizer: Any, seq_len: int, image_spec: dict | None = None,
                 image_tokens: int = IMAGE_TOKENS, newline_loss: bool = False, skip_bad: bool = False,
                 cache_dir: str | Path | None = None) -> None:
        self.path, self.tokenizer, self.seq_len = Path(path), tokenizer, seq_len
        self.image_spec, self.image_tokens, self.newline_loss = image_spec or {}, image_tokens, newline_loss
        if not self.path.is_file():
            raise MiniMindError(f"{self.path}: no such file")
        self.image_token_id = image_pad_id(tokenizer)  # for the model: where the features go
        index = self._cached_index(skip_bad, cache_dir)
        self.numbers, self.positions = index["numbers"], index["positions"]
        self._lengths, self._loss = index["lengths"], index["loss"]
        skipped, longest, truncated, dropped = (int(x) for x in index["counts"])
        self.stats = PackStats(documents=len(self.numbers), rows=len(self.numbers), tokens=int(self._lengths.sum()),
                               truncated=truncated, skipped_bad=skipped, loss_tokens=int(self._loss.sum()),
                               dropped_tokens=dropped, longest=longest, no_loss_rows=int((self._loss == 0).sum()),
                               source_bytes=self.path.stat().st_size)
        if is_parquet(self.path):
            meta = _parquet_file(self.path).metadata
            self.group_starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._group: tuple[int, Any] | None = None  # the row group (an Arrow table) read last

    def _cached_index(self, skip_bad: bool, cache_dir: str | Path | None) -> dict[str, np.ndarray]:
        """_index, kept in the packed-data cache under the file's identity (path, size, time), the tokenizer and
        the settings: a resumed run, or each process of a torchrun, opens a big file without tokenizing it."""
        import hashlib

        from minimind.data.pack import default_cache_dir, tokenizer_json
        from minimind.files import atomic_path

        st = self.path.stat()
        identity = {"format": INDEX_FORMAT, "path": str(self.path.resolve()), "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns, "seq_len": self.seq_len, "image_tokens": self.image_tokens,
                    "newline_loss": self.newline_loss, "skip_bad": skip_bad,
                    "tokenizer_sha256": hashlib.sha256(tokenizer_json(self.tokenizer).encode()).hexdigest()}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        file = Path(cache_dir or default_cache_dir()) / f"{self.path.stem}-vision-{self.seq_len}-{key[:16]}.npz"
        try:
            with np.load(file) as cached:
                if str(cached["key"]) == key:
                    return {k: cached[k] for k in ("numbers", "positions", "lengths", "loss", "counts")}
        except (OSError, KeyError, ValueError):  # none yet, or damaged: build it again
            pass
        index = self._index(skip_bad)
        with atomic_path(file) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, key=np.array(key), **index)
        return index

    def _index(self, skip_bad: bool) -> dict[str, np.ndarray]:
        """Every row's text read and encoded: file numbers and positions of the good rows, their lengths (cut to
        seq_len) and loss tokens, and counts [skipped, longest, truncated, tokens cut]."""
        numbers, positions, lengths, loss = [], [], [], []
        skipped = longest = truncated = dropped = 0
        for n, position, raw in _raw_rows(self.path, images=False):
            try:
                ids, mask = encode_vision(self.tokenizer, _parse_raw(raw, self.path, decode=False), self.seq_len,
                                          self.image_tokens, self.newline_loss)
            except ValueError as e:
                if not skip_bad:
                    raise MiniMindError(f"{self.path}:{n}: {e}") from None
                skipped += 1
                continue
            numbers.append(n)
            positions.append(position)
            lengths.append(min(len(ids), self.seq_len))
            loss.append(sum(mask[:self.seq_len]))
            longest = max(longest, len(ids))
            truncated += len(ids) > self.seq_len
            dropped += max(0, len(ids) - self.seq_len)
        return {k: np.asarray(v, dtype=np.int64) for k, v in (
            ("numbers", numbers), ("positions", positions), ("lengths", lengths), ("loss", loss),
            ("counts", [skipped, longest, truncated, dropped]))}

    def __len__(self) -> int:
        return len(self.numbers)

    def lengths(self) -> np.ndarray:
        return self._lengths

    def loss_tokens_per_row(self) -> np.ndarray:
        return self._loss

    def _raw(self, i: int) -> Any:
        position = int(self.positions[i])
        if is_parquet(self.path):
            g = int(np.searchsorted(self.group_starts, position, side="right")) - 1
            if self._group is None or self._group[0] != g:
                self._group = g, _parquet_file(self.path).read_row_group(g, columns=list(COLUMNS))
            # One row made Python objects, not the group: random order reads a row at a time.
            return self._group[1].slice(position - int(self.group_starts[g]), 1).to_pylist()[0]
        with self.path.open("rb") as fh:
            fh.seek(position)
            raw = fh.readline()
        try:
            return decode_line(raw.removeprefix(b"\xef\xbb\xbf") if position == 0 else raw)
        except ValueError as e:
            return e

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        try:
            row = _parse_raw(self._raw(i), self.path)
            ids, mask = encode_vision(self.tokenizer, row, self.seq_len, self.image_tokens, self.newline_loss)
        except ValueError as e:
            raise MiniMindError(f"{self.path}:{int(self.numbers[i])}: {e}") from None
        return (np.asarray(ids[:self.seq_len], dtype=np.int64), np.asarray(mask[:self.seq_len], dtype=np.uint8),
                preprocess(row["images"], **self.image_spec))


def collate_vision(rows: Sequence[tuple[np.ndarray, np.ndarray, torch.Tensor]],
                   pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A batch: input_ids [B, T] right-padded with pad_id, labels [B, T] (the id where the mask is 1, else -100:
    image pads, user text and padding carry no loss; unshifted, as for SFT), pixel_values [N, 3, H, W] with the
    batch's images in order of appearance, row by row, and image_counts [B] (row b's images in pixel_values)."""
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (ids, mask, _) in enumerate(rows):
        row = torch.as_tensor(ids, dtype=torch.long)
        input_ids[b, :len(row)] = row
        labels[b, :len(row)] = torch.where(torch.as_tensor(mask, dtype=torch.bool), row, -100)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": torch.cat([p for _, _, p in rows]),
            "image_counts": torch.tensor([len(p) for _, _, p in rows], dtype=torch.long)}


# ---------------------------------------------------------------------------------------------- writing


def write_vision_parquet(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows {"conversations": messages, "images": [encoded image bytes], other columns...} as MiniMind-V's
    Parquet: `conversations` a JSON string, `image_bytes` binary (a list of binaries when some row has other
    than one image), extra keys as their own columns. Written atomically; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from minimind.files import atomic_path

    rows = list(rows)
    single = all(len(r["images"]) == 1 for r in rows)
    columns: dict[str, list] = {
        "conversations": [json.dumps(r["conversations"], ensure_ascii=False) for r in rows],
        "image_bytes": [r["images"][0] if single else list(r["images"]) for r in rows],
    }
    for key in dict.fromkeys(k for r in rows for k in r if k not in ("conversations", "images")):
        columns[key] = [r.get(key) for r in rows]
    schema = {"conversations": pa.string(), "image_bytes": pa.binary() if single else pa.list_(pa.binary())}
    table = pa.table({k: pa.array(v, type=schema.get(k)) for k, v in columns.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
    return len(rows)


def image_inputs(model: MiniMindForCausalLM, images: Sequence[Sequence[Any]], source: str = "the model") -> dict | None:
    """generate's `images` for a batch of prompts, given each prompt's images in order of their placeholders:
    {"pixel_values", "image_counts"}, or None when no prompt has an image. MiniMindError naming `source` when
    images meet a model without a vision tower."""
    if not any(images):
        return None
    if not isinstance(model, VisionLanguageModel):
        raise MiniMindError(f"{source}: a language model without a vision tower (its config.json has no "
                            "minimind.vision section), so it cannot read images")
    v = model.vision
    pixels = preprocess([image for row in images for image in row], size=v.image_size, mean=v.image_mean,
                        std=v.image_std)
    return {"pixel_values": pixels.to(model.model.embed_tokens.weight.device),
            "image_counts": [len(row) for row in images]}
