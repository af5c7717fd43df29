"""Built-in image data, drawn by the project with PIL (deterministic for a seed) with known answers: scenes of
coloured shapes (which shape, what colour, how many, left or right of, bigger or smaller), digits and words to
read, bar charts (which bar is highest); questions in English and Chinese; caption rows for a pretrain stage.
An image's split is a hash of its canonical form (tasks.split_of), so no seed brings a held-out image into
training. `rows = make_vision(500, seed=0, size=64)`; `write_vision_builtin("data/", size=64)`."""

from __future__ import annotations

import ast
import io
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from minimind import MiniMindError
from minimind.chat import IMAGE
from minimind.data.pack_workers import PackStats
from minimind.data.tasks import DEDUPE_TRIES, SPLIT_TRIES, SPLITS, split_of
from minimind.data.vision import IMAGE_SIZE, preprocess, write_vision_parquet

KINDS = ("shape", "colour", "count", "position", "size", "read", "chart")
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20),
           "purple": (140, 60, 180), "orange": (245, 130, 30)}
GRID = 3  # objects sit in a 3x3 grid of cells, one per cell, so none overlap
# A shape's reach from its centre as a fraction of a cell: small, medium, big. Every shape of one size has the
# same area (see _draw_object), and each size has over 1.7 times the area of the one below, so "bigger" is
# plain whatever the two shapes are. Reach plus jitter stays within half a cell: shapes never overlap.
SIZES = (0.24, 0.32, 0.42)
JITTER = 0.08  # an object's centre moves up to this fraction of a cell off the cell's centre
MAX_COUNT = 5
BARS = (3, 4, 5)  # bars per chart
LEVELS = 8  # bar heights are 1..LEVELS
TEXT_COLOURS = ((0, 0, 0), (30, 30, 120), (120, 20, 20))
WORDS = ("cat", "dog", "sun", "red", "map", "cup", "box", "pen", "bus", "egg", "hat", "key", "owl", "fox", "bee",
         "ant", "car", "toy", "sky", "tea", "book", "fish", "tree", "moon", "star", "bird", "cake", "frog", "lamp",
         "ship", "milk", "rain", "door", "ball", "bell", "kite", "leaf", "rose", "king", "duck")

NAMES = {
    "en": {"circle": "circle", "square": "square", "triangle": "triangle", "red": "red", "green": "green",
           "blue": "blue", "yellow": "yellow", "purple": "purple", "orange": "orange"},
    "zh": {"circle": "圆形", "square": "正方形", "triangle": "三角形", "red": "红色", "green": "绿色", "blue": "蓝色",
           "yellow": "黄色", "purple": "紫色", "orange": "橙色"},
}
PLACES = {"en": ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"),
          "zh": ("左上方", "上方", "右上方", "左边", "中间", "右边", "左下方", "下方", "右下方")}
SIZE_WORDS = {"en": ("small", "medium", "big"), "zh": ("小", "中等大小", "大")}
# Fixed phrasing per language (a tiny model learns a template quickly, variety slowly); {} fields filled in.
TEXT = {
    "en": {
        "shape": (("What shape is this?", "What shape is in the picture?"), "A {}."),
        "colour": (("What colour is the shape?", "What colour is this shape?"), "{}."),
        "count": (("How many {}s are there?", "Count the {}s in the picture."), "{}."),
        "position": (("Is the {} left or right of the {}?",), "{}."),
        "size": (("Is the {} bigger or smaller than the {}?",), "{}."),
        "read": (("What is written in the image?", "Read the text in the image."), "It says {}."),
        "chart": (("Which bar is the highest?", "Which bar is tallest?"), "Bar {}."),
        "caption": (("Describe the image.", "What is in this picture?"), None),
    },
    "zh": {
        "shape": (("图中是什么形状？", "这个图形是什么形状？"), "{}。"),
        "colour": (("这个图形是什么颜色？", "图中图形的颜色是什么？"), "{}。"),
        "count": (("图中有几个{}？", "数一数图中有多少个{}。"), "{} 个。"),
        "position": (("{}在{}的左边还是右边？",), "{}。"),
        "size": (("{}比{}大还是小？",), "{}。"),
        "read": (("图中写的是什么？", "读出图中的文字。"), "写的是 {}。"),
        "chart": (("哪根柱子最高？", "这个柱状图里哪根柱子最高？"), "{} 柱最高。"),
        "caption": (("描述这张图片。", "图片里有什么？"), None),
    },
}
CAPTIONS = {  # the caption rows' replies, by scene
    "en": {"text": 'The image shows the text "{text}".',
           "chart": "A bar chart with {n} bars; bar {best} is the highest.",
           "two": "A {left} on the left and a {right} on the right; the {big} is bigger.",
           "one": "A {size} {name} at the {place}.", "many": "There are {n} {colour} {shape}s."},
    "zh": {"text": '图中写着 "{text}"。', "chart": "有 {n} 根柱子的柱状图，{best} 柱最高。",
           "two": "左边是{left}，右边是{right}；{big}更大。", "one": "{place}有一个{size}的{name}。",
           "many": "图中有 {n} 个{name}。"},
}
# Every answer a kind allows, per language: is_correct takes the first one the reply names.
OPTIONS = {
    "shape": {lang: tuple(NAMES[lang][s] for s in SHAPES) for lang in NAMES},
    "colour": {lang: tuple(NAMES[lang][c] for c in COLOURS) for lang in NAMES},
    "count": {lang: tuple(str(n) for n in range(1, MAX_COUNT + 1)) for lang in NAMES},
    "position": {"en": ("left", "right"), "zh": ("左边", "右边")},
    "size": {"en": ("bigger", "smaller"), "zh": ("大", "小")},
    "chart": {lang: tuple("ABCDE"[:max(BARS)]) for lang in NAMES},
}
NUMBERS = tuple(str(n) for n in range(1000))  # read: a number or a word, half and half
# Chance per kind: the accuracy of the best fixed answer (in the question's language). Answers are drawn
# uniformly; bar "A" is right 1/bars of the time; a set's texts to read hardly repeat (make_vision draws no
# image twice while unseen ones remain), so one fixed text is right about once in all of them.
CHANCE = {**{k: 1 / len(v["en"]) for k, v in OPTIONS.items() if k != "chart"},
          "read": 1 / (len(NUMBERS) + len(WORDS)), "chart": sum(1 / n for n in BARS) / len(BARS)}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cell: int  # 0..8, row-major in the 3x3 grid
    size: int  # index into SIZES
    dx: int = 0  # jitter in -1..1, times JITTER of a cell
    dy: int = 0

    def name(self, lang: str) -> str:
        colour, shape = NAMES[lang][self.colour], NAMES[lang][self.shape]
        return f"{colour} {shape}" if lang == "en" else colour + shape


@dataclass(frozen=True)
class Scene:
    """What an image shows. `key` is its canonical form: objects scenes are all content; a text's and a chart's
    placement and colour are presentation, so the same text or heights never fall into both splits."""

    objects: tuple[Obj, ...] = ()
    text: str = ""
    bars: tuple[int, ...] = ()
    style: tuple[int, ...] = ()  # presentation of text (colour, dx, dy) and charts (colour)

    @property
    def key(self) -> tuple:
        if self.text:
            return ("text", self.text)
        if self.bars:
            return ("chart", self.bars)
        return ("objects", tuple(sorted((o.shape, o.colour, o.cell, o.size, o.dx, o.dy) for o in self.objects)))

    def render(self, size: int = IMAGE_SIZE) -> Image.Image:
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        if self.text:
            colour, dx, dy = self.style
            font = ImageFont.load_default(size=max(6, round(size * 0.3)))
            left, top, right, bottom = draw.textbbox((0, 0), self.text, font=font)
            x = (size - (right - left)) / 2 - left + dx * size / 32
            y = (size - (bottom - top)) / 2 - top + dy * size / 32
            draw.text((x, y), self.text, fill=TEXT_COLOURS[colour], font=font)
        elif self.bars:
            _draw_chart(draw, self.bars, list(COLOURS.values())[self.style[0]], size)
        for o in self.objects:
            _draw_object(draw, o, size)
        return image


def _draw_object(draw: ImageDraw.ImageDraw, o: Obj, size: int) -> None:
    cell = size / GRID
    cx = (o.cell % GRID + 0.5 + o.dx * JITTER) * cell
    cy = (o.cell // GRID + 0.5 + o.dy * JITTER) * cell
    r = SIZES[o.size] * cell
    fill = COLOURS[o.colour]
    # The triangle (base 2r, height 1.8r) has area 1.8 r^2; the circle and the square are scaled to match.
    if o.shape == "circle":
        rc = r * math.sqrt(1.8 / math.pi)
        draw.ellipse((cx - rc, cy - rc, cx + rc, cy + rc), fill=fill)
    elif o.shape == "square":
        h = r * math.sqrt(1.8) / 2
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)


def _draw_chart(draw: ImageDraw.ImageDraw, bars: tuple[int, ...], colour: tuple, size: int) -> None:
    base, top, margin = 0.8 * size, 0.1 * size, 0.08 * size
    slot = (size - 2 * margin) / len(bars)
    font = ImageFont.load_default(size=max(6, round(size * 0.13)))
    draw.line((margin, base, size - margin, base), fill=(0, 0, 0), width=max(1, size // 64))
    for i, level in enumerate(bars):
        x0 = margin + (i + 0.15) * slot
        draw.rectangle((x0, base - level / LEVELS * (base - top), x0 + 0.7 * slot, base), fill=colour)
        label = "ABCDE"[i]
        left, _, right, _ = draw.textbbox((0, 0), label, font=font)
        draw.text((x0 + 0.35 * slot - (right - left) / 2 - left, base + 0.02 * size), label, fill=(0, 0, 0),
                  font=font)


# ---------------------------------------------------------------------------------------------- scenes


def _obj(rng: random.Random, cell: int, shape: str | None = None, colour: str | None = None,
         size: int | None = None) -> Obj:
    return Obj(shape or rng.choice(SHAPES), colour or rng.choice(list(COLOURS)), cell,
               rng.randrange(len(SIZES)) if size is None else size, rng.randint(-1, 1), rng.randint(-1, 1))


def _one(rng: random.Random) -> Scene:
    return Scene((_obj(rng, rng.randrange(GRID * GRID)),))


def _many(rng: random.Random) -> Scene:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    cells = rng.sample(range(GRID * GRID), rng.randint(1, MAX_COUNT))
    return Scene(tuple(_obj(rng, c, shape, colour) for c in sorted(cells)))


def _two(rng: random.Random) -> Scene:
    """Two objects told apart by name, in different columns and of different sizes."""
    col_a, col_b = rng.sample(range(GRID), 2)
    size_a, size_b = rng.sample(range(len(SIZES)), 2)
    a = _obj(rng, rng.randrange(GRID) * GRID + col_a, size=size_a)
    while True:
        b = _obj(rng, rng.randrange(GRID) * GRID + col_b, size=size_b)
        if (b.shape, b.colour) != (a.shape, a.colour):
            return Scene((a, b))


def _text(rng: random.Random) -> Scene:
    text = rng.choice(NUMBERS) if rng.random() < 0.5 else rng.choice(WORDS)
    return Scene(text=text, style=(rng.randrange(len(TEXT_COLOURS)), rng.randint(-2, 2), rng.randint(-2, 2)))


def _chart(rng: random.Random) -> Scene:
    n = rng.choice(BARS)
    while True:
        bars = tuple(rng.randint(1, LEVELS) for _ in range(n))
        if bars.count(max(bars)) == 1:
            return Scene(bars=bars, style=(rng.randrange(len(COLOURS)),))


SCENES = {"shape": _one, "colour": _one, "count": _many, "position": _two, "size": _two, "read": _text,
          "chart": _chart}


def _qa(scene: Scene, kind: str, lang: str, rng: random.Random) -> tuple[str, str, str]:
    """(question, reply, answer) about the scene."""
    questions, reply = TEXT[lang][kind]
    names = NAMES[lang]
    question = rng.choice(questions)
    if kind in ("shape", "colour"):
        answer = names[getattr(scene.objects[0], kind)]
    elif kind == "count":
        answer, question = str(len(scene.objects)), question.format(names[scene.objects[0].shape])
    elif kind in ("position", "size"):
        a, b = rng.sample(scene.objects, 2)
        question = question.format(a.name(lang), b.name(lang))
        # The first option is "left" / "bigger".
        first = a.cell % GRID < b.cell % GRID if kind == "position" else a.size > b.size
        answer = OPTIONS[kind][lang][0 if first else 1]
    elif kind == "read":
        answer = scene.text
    else:
        answer = "ABCDE"[scene.bars.index(max(scene.bars))]
    shown = answer.capitalize() if lang == "en" and kind in ("colour", "position", "size") else answer
    return question, reply.format(shown), answer


def caption(scene: Scene, lang: str) -> str:
    """A description of the scene, for the caption (pretrain) rows."""
    objs, words = scene.objects, CAPTIONS[lang]
    if scene.text:
        return words["text"].format(text=scene.text)
    if scene.bars:
        return words["chart"].format(n=len(scene.bars), best="ABCDE"[scene.bars.index(max(scene.bars))])
    if len(objs) == 2 and (objs[0].shape, objs[0].colour) != (objs[1].shape, objs[1].colour):
        left, right = sorted(objs, key=lambda o: o.cell % GRID)
        big = max(objs, key=lambda o: o.size)
        return words["two"].format(left=left.name(lang), right=right.name(lang), big=big.name(lang))
    o = objs[0]
    if len(objs) == 1:
        return words["one"].format(size=SIZE_WORDS[lang][o.size], name=o.name(lang), place=PLACES[lang][o.cell])
    return words["many"].format(n=len(objs), name=o.name(lang), colour=NAMES[lang][o.colour],
                                shape=NAMES[lang][o.shape])


# ---------------------------------------------------------------------------------------------- rows


def png(image: Image.Image) -> bytes:
    """Lossless, so a small shape keeps its exact colour (JPEG's chroma subsampling smears a few pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    chosen = tuple(kinds) if kinds else KINDS
    unknown = [k for k in chosen if k not in SCENES]
    if unknown:
        raise MiniMindError(f"unknown image question kind {unknown[0]!r}; expected one of {', '.join(KINDS)}")
    return chosen


def make_vision(n: int, seed: int = 0, kinds: Sequence[str] | None = None, split: str = "train",
                size: int = IMAGE_SIZE, captions: bool = False) -> list[dict]:
    """`n` rows {"conversations", "images": [PNG bytes], "kind", "lang", "answer", "key"}, deterministic for
    `seed`: kinds taken in turn (then shuffled), half English and half Chinese, every image from `split`, no
    image and question twice where the kind has enough of them. captions: describe-the-image rows of the same
    scenes instead (kind "caption", answer the caption)."""
    if split not in SPLITS:
        raise MiniMindError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    chosen = _kinds(kinds)
    rng = random.Random(f"minimind-vision/{seed}/{split}/{'captions' if captions else 'questions'}")
    rows, seen = [], set()
    for i in range(n):
        kind = chosen[i % len(chosen)]
        picked = None
        for attempt in range(SPLIT_TRIES):
            scene = SCENES[kind](rng)
            if split_of(scene.key) != split:
                continue
            picked = scene
            if (scene.key, kind) not in seen or attempt >= DEDUPE_TRIES:
                break
        if picked is None:
            raise MiniMindError(f"image kind {kind!r} produced no {split} image in {SPLIT_TRIES} tries")
        seen.add((picked.key, kind))
        lang = rng.choice(("en", "zh"))
        if captions:
            question, reply = rng.choice(TEXT[lang]["caption"][0]), caption(picked, lang)
            kind, answer = "caption", reply
        else:
            question, reply, answer = _qa(picked, kind, lang, rng)
        rows.append({"conversations": [{"role": "user", "content": f"{IMAGE}\n{question}"},
                                       {"role": "assistant", "content": reply}],
                     "images": [png(picked.render(size))], "kind": kind, "lang": lang, "answer": answer,
                     "key": repr(picked.key)})
    rng.shuffle(rows)
    return rows


def is_correct(row: dict, text: str) -> bool:
    """Whether a reply gives the row's answer: for a kind with a closed set of answers, the first one the reply
    names (whole words in English; case-insensitive but for chart letters); for read, the text as the reply
    template frames it, or the whole reply, with quotes and end punctuation stripped."""
    kind, lang, answer = row["kind"], row["lang"], row["answer"]
    if kind == "read":
        template = TEXT[lang]["read"][1]
        pattern = re.escape(template).replace(re.escape("{}"), "(.+?)")
        match = re.fullmatch(pattern, text.strip())
        said = (match[1] if match else text).strip().strip("\"'“”.。 ")
        return said.lower() == answer.lower()
    flags = 0 if kind == "chart" else re.IGNORECASE
    found = []
    for option in OPTIONS[kind][lang]:
        pattern = rf"(?<![A-Za-z0-9]){re.escape(option)}(?![A-Za-z0-9])" if lang == "en" or kind in ("count", "chart") \
            else re.escape(option)
        hit = re.search(pattern, text, flags)
        if hit:
            found.append((hit.start(), option))
    return bool(found) and min(found)[1] == answer


# What an image of objects shows, as class labels for a vision tower trained alone (train.vision.VisionTowerStage):
# label -> classes. The objects are taken left to right (column, then row): the first is the left-most, the
# second the other one of a two-object scene (-100, no label, elsewhere). Naming both objects' shape, colour,
# size and place asks the tower for what every question kind needs, bound to the object it belongs to.
SCENE_LABELS = {"count": MAX_COUNT, "shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES),
                "column": GRID, "row": GRID, "shape2": len(SHAPES), "colour2": len(COLOURS), "size2": len(SIZES),
                "column2": GRID, "row2": GRID}
NO_LABEL = -100


def scene_labels(scene: Scene) -> list[int]:
    """The scene's SCENE_LABELS values, in order (NO_LABEL where a label does not apply)."""
    objs = sorted(scene.objects, key=lambda o: (o.cell % GRID, o.cell // GRID))
    if not objs:
        return [NO_LABEL] * len(SCENE_LABELS)
    out = [len(objs) - 1]
    for o in objs[:2] if len(objs) == 2 else objs[:1]:
        out += [SHAPES.index(o.shape), list(COLOURS).index(o.colour), o.size, o.cell % GRID, o.cell // GRID]
    return out + [NO_LABEL] * (len(SCENE_LABELS) - len(out))


def scene_of_key(text: str) -> Scene:
    """The scene of an objects image from its `key` column (repr of Scene.key); ValueError if it is not one."""
    try:
        kind, objs = ast.literal_eval(text)  # a literal only: never code
        scene = Scene(tuple(Obj(*o) for o in objs)) if kind == "objects" else None
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        scene = None
    if scene is None or not scene.objects or not all(
            o.shape in SHAPES and o.colour in COLOURS and o.cell in range(GRID * GRID) and o.size in range(len(SIZES))
            for o in scene.objects) or len(scene.objects) > MAX_COUNT:
        raise ValueError(f"key {text[:80]!r} is not a scene of objects")
    return scene


class SceneDataset:
    """The images of a built-in image Parquet (write_vision_builtin's: its `key` column names each scene) with
    their scene_labels, for VisionTowerStage: item i is (pixel_values [1, 3, H, W], labels int64
    [len(SCENE_LABELS)]). A row that is not a scene of objects raises MiniMindError naming file and row.
    `image_spec`: preprocess's keyword arguments; `image_tokens` (the tower's patches) only counts `.stats`."""

    def __init__(self, path: str | Path, image_spec: dict, image_tokens: int) -> None:
        import pyarrow.parquet as pq

        self.path, self.image_spec = Path(path), image_spec
        if not self.path.is_file():
            raise MiniMindError(f"{self.path}: no such file")
        names = pq.ParquetFile(self.path).schema_arrow.names
        if "key" not in names or "image_bytes" not in names:
            raise MiniMindError(f"{self.path}: no `key` and `image_bytes` columns: a vision tower trains alone on "
                                "the built-in images (write_vision_builtin), whose `key` names each scene")
        table = pq.read_table(self.path, columns=["image_bytes", "key"]).to_pydict()
        self.images, labels = table["image_bytes"], []
        for n, key in enumerate(table["key"], 1):
            try:
                labels.append(scene_labels(scene_of_key(key if isinstance(key, str) else "")))
            except ValueError as e:
                raise MiniMindError(f"{self.path}:{n}: {e}") from None
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.stats = PackStats(documents=len(labels), rows=len(labels), tokens=len(labels) * image_tokens,
                               source_bytes=self.path.stat().st_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        return preprocess([image[0] if isinstance(image, list) else image], **self.image_spec), self.labels[i]


def write_vision_builtin(out_dir: str | Path, seed: int = 0, size: int = IMAGE_SIZE, sft_rows: int = 4000,
                         caption_rows: int = 2000, heldout_rows: int = 700,
                         kinds: Sequence[str] | None = None) -> dict[str, Path]:
    """Write the built-in image sets into out_dir as MiniMind-V's Parquet (conversations, image_bytes, plus kind,
    lang, answer and key columns, which its reader ignores); returns {name: path}. vision_pretrain: captions;
    vision_sft: questions; vision_heldout: questions on held-out images only, with their answers."""
    out = Path(out_dir)
    paths = {name: out / f"{name}.parquet" for name in ("vision_pretrain", "vision_sft", "vision_heldout")}
    write_vision_parquet(paths["vision_pretrain"], make_vision(caption_rows, seed, kinds, "train", size, True))
    write_vision_parquet(paths["vision_sft"], make_vision(sft_rows, seed, kinds, "train", size))
    write_vision_parquet(paths["vision_heldout"], make_vision(heldout_rows, seed, kinds, "heldout", size))
    return paths
