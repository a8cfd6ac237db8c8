"""Procedurally rendered captioned scenes: the embedded default data for the captioning stage.

Each scene is drawn with Pillow from a seed, so nothing is downloaded and the text is exact:
every count, colour, word and relative position in a caption or answer is read off the
parameters the image was drawn from. Shapes are drawn without antialiasing, so each object's
pixels are exactly its named colour; only the rendered word or number is antialiased.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import random
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 with x1, y1 exclusive, as in numpy slicing

COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (250, 220, 30),
    "orange": (250, 140, 20),
    "purple": (140, 40, 170),
    "pink": (250, 130, 180),
    "brown": (130, 80, 30),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "beige": (235, 220, 180),
    "navy": (20, 30, 90),
    "light blue": (170, 210, 240),
    "dark green": (20, 80, 40),
}
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "white", "black")
BACKGROUND_COLOURS = ("grey", "white", "black", "beige", "navy", "light blue", "dark green")
SHAPES = ("circle", "square", "rectangle", "triangle", "star")
WORDS = (
    "CAT",
    "DOG",
    "SUN",
    "SKY",
    "TREE",
    "BOOK",
    "STOP",
    "GO",
    "HELLO",
    "FISH",
    "MOON",
    "BIRD",
    "RAIN",
    "BOAT",
    "HOME",
    "CAKE",
    "KING",
    "JAZZ",
    "MAP",
    "OK",
)
MIN_SIDE, MAX_SIDE = 96, 448
# An object's side as a share of sqrt(image area): large enough to span a few 16x16 patches once a
# scene is resized to a CPU run's budget (e.g. 128x128 pixels).
OBJECT_SIZE = (0.15, 0.3)
VAL_START = 10**12  # far beyond any train set, so the train split can grow without reaching it

_MIN_OBJECT_CONTRAST = 120.0  # RGB distance an object or text keeps from every background tone
_MIN_TONE_CONTRAST = 60.0  # between the two tones of a two-tone background
_PAD = 2  # px kept free at the image border
_GAP = 3  # px kept free between objects, so none touch
_PLACEMENT_TRIES = 40
_MIN_FONT_SIZE = 12
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_RELATION_ANSWERS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape."""

    shape: str
    colour: str
    bbox: Box  # tight around its pixels


@dataclass(frozen=True)
class SceneText:
    """The rendered word or number."""

    text: str
    kind: str  # "word" or "number"
    colour: str
    bbox: Box  # the font's box around the ink; antialiased pixels stay inside it


@dataclass(frozen=True)
class Question:
    """A short-answer question about a scene."""

    kind: str  # what it asks about: one of QUESTION_KINDS
    question: str
    answer: str


# What the questions ask about: colours, shapes, counts, relative positions, text in the image.
QUESTION_KINDS = (
    "background",
    "colour",
    "shape",
    "count",
    "count_colour",
    "position",
    "text_presence",
    "text",
    "text_colour",
)


@dataclass(frozen=True)
class Scene:
    """One rendered scene with its exact text."""

    image: Image.Image  # RGB
    caption: str
    qa: tuple[tuple[str, str], ...]  # (question, answer): 2 to 4 of `questions`, for a training conversation
    objects: tuple[SceneObject, ...]
    text: SceneText | None
    background: tuple[str, ...]  # one colour, or two: the top or left tone first
    questions: tuple[Question, ...]  # every question the scene answers


def render_scene(index: int, seed: int = 0) -> Scene:
    """The scene at `index`: the same image bytes and text for the same (index, seed)."""
    rng = random.Random(f"{seed}-{index}")
    width, height = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
    background = _pick_background(rng)
    image = Image.new("RGB", (width, height), COLOURS[background[0]])
    draw = ImageDraw.Draw(image)
    if len(background) == 2:
        if rng.random() < 0.5:
            split = rng.randint(int(0.3 * width), int(0.7 * width))
            draw.rectangle((split, 0, width - 1, height - 1), fill=COLOURS[background[1]])
        else:
            split = rng.randint(int(0.3 * height), int(0.7 * height))
            draw.rectangle((0, split, width - 1, height - 1), fill=COLOURS[background[1]])

    colours = [c for c in OBJECT_COLOURS if all(_distance(c, b) >= _MIN_OBJECT_CONTRAST for b in background)]
    objects = _draw_objects(rng, draw, width, height, colours)
    text = _draw_text(rng, draw, width, height, colours, [o.bbox for o in objects]) if rng.random() < 0.4 else None

    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for obj in objects:
        groups.setdefault((obj.colour, obj.shape), []).append(obj)
    relations = _clear_relations(groups, width, height)
    relation = rng.choice(relations) if relations else None
    caption = _caption(groups, text, background, relation)
    questions = _questions(rng, groups, text, background, relations)
    qa = tuple((q.question, q.answer) for q in rng.sample(questions, rng.randint(2, 4)))
    return Scene(
        image=image,
        caption=caption,
        qa=qa,
        objects=tuple(objects),
        text=text,
        background=background,
        questions=questions,
    )


def grounded_caption(scene: Scene, bins: int = 10) -> str:
    """A dense caption in the manner of LocCa's grounded captioning (SigLIP2's decoder task):
    the background, the object count, then every object, largest first, with its centre as
    (column, row) on a `bins` x `bins` grid, then the text and where it is. Reading it back
    needs every object's colour, shape, size order and place."""
    width, height = scene.image.size

    def at(box: Box) -> str:
        column = min(bins - 1, bins * (box[0] + box[2]) // (2 * width))
        row = min(bins - 1, bins * (box[1] + box[3]) // (2 * height))
        return f"at {column} {row}"

    largest_first = sorted(scene.objects, key=lambda o: -(o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]))
    count = len(scene.objects)
    parts = [f"Background: {' and '.join(scene.background)}.", f"{count} object{'s' if count != 1 else ''}"]
    if largest_first:
        parts[-1] += ": " + ", ".join(f"{_article(o.colour)} {o.colour} {o.shape} {at(o.bbox)}" for o in largest_first)
    parts[-1] += "."
    if scene.text is not None:
        parts.append(f"Text: the {scene.text.kind} {scene.text.text} in {scene.text.colour} {at(scene.text.bbox)}.")
    return " ".join(parts)


def scene_split(num_train: int, num_val: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Disjoint (train, val) scene indices. Each list depends only on its own size, so growing
    the train set never changes the val set. The split is the same for every `seed`: the
    seed changes what an index renders, not which split the index is in."""
    if not 0 <= num_train <= VAL_START or num_val < 0:
        raise ValueError(
            f"scene_split: need 0 <= num_train <= {VAL_START} and num_val >= 0, "
            f"got num_train={num_train}, num_val={num_val}"
        )
    return list(range(num_train)), list(range(VAL_START, VAL_START + num_val))


def _distance(a: str, b: str) -> float:
    return math.dist(COLOURS[a], COLOURS[b])


def _pick_background(rng: random.Random) -> tuple[str, ...]:
    first = rng.choice(BACKGROUND_COLOURS)
    if rng.random() < 0.7:
        return (first,)
    return first, rng.choice([c for c in BACKGROUND_COLOURS if _distance(c, first) >= _MIN_TONE_CONTRAST])


def _draw_objects(
    rng: random.Random, draw: ImageDraw.ImageDraw, width: int, height: int, colours: list[str]
) -> list[SceneObject]:
    """1 to 5 objects in 1 to 3 (colour, shape) groups of distinct colours (so a colour names a
    group); an object that finds no free spot is left out."""
    kinds: list[tuple[str, str]] = []
    for _ in range(rng.randint(1, 3)):
        kind = (rng.choice(colours), rng.choice(SHAPES))
        if all(colour != kind[0] for colour, _ in kinds):
            kinds.append(kind)
    counts = [1] * len(kinds)
    for _ in range(rng.randint(0, 5 - len(kinds))):
        counts[rng.randrange(len(kinds))] += 1

    objects: list[SceneObject] = []
    for (colour, shape), count in zip(kinds, counts):
        for _ in range(count):
            size = round(rng.uniform(*OBJECT_SIZE) * math.sqrt(width * height))
            size = min(max(12, size), min(width, height) - 2 * _PAD)
            box_w, box_h, polygon = _shape_outline(rng, shape, size)
            spot = _free_spot(rng, width, height, box_w, box_h, [o.bbox for o in objects])
            if spot is None:
                continue
            x0, y0 = spot
            fill = COLOURS[colour]
            if polygon is not None:
                draw.polygon([(x0 + x, y0 + y) for x, y in polygon], fill=fill)
            elif shape == "circle":
                draw.ellipse((x0, y0, x0 + box_w - 1, y0 + box_h - 1), fill=fill)
            else:
                draw.rectangle((x0, y0, x0 + box_w - 1, y0 + box_h - 1), fill=fill)
            objects.append(SceneObject(shape, colour, (x0, y0, x0 + box_w, y0 + box_h)))
    return objects


def _shape_outline(rng: random.Random, shape: str, size: int) -> tuple[int, int, list[tuple[int, int]] | None]:
    """(box width, box height, polygon in box coordinates or None for a circle or box-filling shape)."""
    if shape in ("circle", "square"):
        return size, size, None
    if shape == "rectangle":
        short = round(size * rng.uniform(0.4, 0.6))
        return (size, short, None) if rng.random() < 0.5 else (short, size, None)
    if shape == "triangle":
        tall = round(size * 0.87)
        apex, base = (0, tall - 1) if rng.random() < 0.5 else (tall - 1, 0)
        return size, tall, [(0, base), (size - 1, base), (round((size - 1) / 2), apex)]
    # star: five points, inner radius just under half the outer one
    radius = (size - 1) / 2
    rounded = []
    for k in range(10):
        r = radius if k % 2 == 0 else 0.45 * radius
        angle = math.radians(-90 + 36 * k)
        rounded.append((round(radius + r * math.cos(angle)), round(radius + r * math.sin(angle))))
    left, top = min(x for x, _ in rounded), min(y for _, y in rounded)
    polygon = [(x - left, y - top) for x, y in rounded]
    return max(x for x, _ in polygon) + 1, max(y for _, y in polygon) + 1, polygon


def _free_spot(
    rng: random.Random, width: int, height: int, box_w: int, box_h: int, taken: list[Box]
) -> tuple[int, int] | None:
    """A top-left corner where a box_w x box_h box fits inside the image, clear of `taken`."""
    if box_w > width - 2 * _PAD or box_h > height - 2 * _PAD:
        return None
    for _ in range(_PLACEMENT_TRIES):
        x0 = rng.randint(_PAD, width - _PAD - box_w)
        y0 = rng.randint(_PAD, height - _PAD - box_h)
        if all(
            x0 + box_w + _GAP <= a0 or a1 + _GAP <= x0 or y0 + box_h + _GAP <= b0 or b1 + _GAP <= y0
            for a0, b0, a1, b1 in taken
        ):
            return x0, y0
    return None


@functools.cache
def _font_dir() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("scenes need the DejaVu fonts that ship with matplotlib: install matplotlib")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


@functools.lru_cache(maxsize=256)
def _font(bold: bool, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_dir() / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")), size)


def _draw_text(
    rng: random.Random, draw: ImageDraw.ImageDraw, width: int, height: int, colours: list[str], taken: list[Box]
) -> SceneText | None:
    """A word or number in a free spot, or None where it does not fit."""
    kind = "word" if rng.random() < 0.65 else "number"
    text = rng.choice(WORDS) if kind == "word" else str(rng.randint(0, 999))
    colour = rng.choice(colours)
    bold = rng.random() < 0.6
    size = rng.randint(14, max(14, min(56, int(0.3 * min(width, height)))))
    left, top, right, bottom = _font(bold, size).getbbox(text)
    room = width - 2 * _PAD
    if right - left > room:
        size = size * room // (right - left)
        if size < _MIN_FONT_SIZE:
            return None
        left, top, right, bottom = _font(bold, size).getbbox(text)
    spot = _free_spot(rng, width, height, right - left, bottom - top, taken)
    if spot is None:
        return None
    x0, y0 = spot
    draw.text((x0 - left, y0 - top), text, fill=COLOURS[colour], font=_font(bold, size))
    return SceneText(text, kind, colour, (x0, y0, x0 + right - left, y0 + bottom - top))


def _clear_relations(
    groups: dict[tuple[str, str], list[SceneObject]], width: int, height: int
) -> list[tuple[tuple[str, str], str, tuple[str, str]]]:
    """(subject, relation, reference) for group pairs whose boxes are apart along an axis by a
    clear margin, so the relation holds for every object of both groups."""
    margin_x, margin_y = max(4, width // 20), max(4, height // 20)
    relations = []
    for a, b in permutations(groups, 2):
        boxes_a = [o.bbox for o in groups[a]]
        boxes_b = [o.bbox for o in groups[b]]
        if max(x1 for _, _, x1, _ in boxes_a) + margin_x <= min(x0 for x0, _, _, _ in boxes_b):
            relations.append((a, "to the left of", b))
        if max(x1 for _, _, x1, _ in boxes_b) + margin_x <= min(x0 for x0, _, _, _ in boxes_a):
            relations.append((a, "to the right of", b))
        if max(y1 for _, _, _, y1 in boxes_a) + margin_y <= min(y0 for _, y0, _, _ in boxes_b):
            relations.append((a, "above", b))
        if max(y1 for _, _, _, y1 in boxes_b) + margin_y <= min(y0 for _, y0, _, _ in boxes_a):
            relations.append((a, "below", b))
    return relations


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _counted(kind: tuple[str, str], count: int) -> str:
    colour, shape = kind
    if count == 1:
        return f"{_article(colour)} {colour} {shape}"
    return f"{_NUMBER_WORDS[count]} {colour} {shape}s"


def _the(kind: tuple[str, str], count: int) -> str:
    colour, shape = kind
    return f"the {colour} {shape}" + ("s" if count > 1 else "")


def _coloured(kind: tuple[str, str], count: int) -> str:
    return f"the {kind[0]} object" + ("s" if count > 1 else "")


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _caption(
    groups: dict[tuple[str, str], list[SceneObject]],
    text: SceneText | None,
    background: tuple[str, ...],
    relation: tuple[tuple[str, str], str, tuple[str, str]] | None,
) -> str:
    items = [_counted(kind, len(objs)) for kind, objs in groups.items()]
    if text is not None:
        items.append(f"the {text.kind} {text.text} in {text.colour}")
    tones = " and ".join(background)
    first = _listed(items)
    sentences = [f"{first[0].upper()}{first[1:]} on {_article(tones)} {tones} background."]
    if relation is not None:
        subject, where, reference = relation
        verb = "is" if len(groups[subject]) == 1 else "are"
        sentences.append(
            f"{_the(subject, len(groups[subject])).capitalize()} {verb} {where} "
            f"{_the(reference, len(groups[reference]))}."
        )
    return " ".join(sentences)


def _questions(
    rng: random.Random,
    groups: dict[tuple[str, str], list[SceneObject]],
    text: SceneText | None,
    background: tuple[str, ...],
    relations: list[tuple[tuple[str, str], str, tuple[str, str]]],
) -> tuple[Question, ...]:
    """Every short-answer question the scene answers, each read off the scene's parameters."""
    counts = {colour: len(objs) for (colour, _), objs in groups.items()}
    candidates = [
        Question("background", "What is the background colour?", " and ".join(background)),
        Question("count", "How many shapes are there?", str(sum(counts.values()))),
        Question("text_presence", "Is there any text in the image?", "yes" if text is not None else "no"),
    ]
    candidates += [
        Question("count_colour", f"How many {colour} objects are there?", str(n)) for colour, n in counts.items()
    ]
    absent = [colour for colour in OBJECT_COLOURS if colour not in counts and colour not in background]
    candidates.append(Question("count_colour", f"How many {rng.choice(absent)} objects are there?", "0"))
    for shape in SHAPES:
        kinds = [kind for kind in groups if kind[1] == shape]
        if len(kinds) == 1:
            colour = kinds[0][0]
            question = (
                f"What colour is the {shape}?" if len(groups[kinds[0]]) == 1 else f"What colour are the {shape}s?"
            )
            candidates.append(Question("colour", question, colour))
    for colour in OBJECT_COLOURS:
        kinds = [kind for kind in groups if kind[0] == colour]
        if len(kinds) == 1:
            question = (
                f"What shape is the {colour} object?"
                if len(groups[kinds[0]]) == 1
                else f"What shape are the {colour} objects?"
            )
            candidates.append(Question("shape", question, kinds[0][1]))
    if relations:  # objects named by colour: a position question needs no shape recognition
        subject, where, reference = rng.choice(relations)
        choice = "left or right of" if where.startswith("to the") else "above or below"
        verb = "Is" if len(groups[subject]) == 1 else "Are"
        candidates.append(
            Question(
                "position",
                f"{verb} {_coloured(subject, len(groups[subject]))} {choice} "
                f"{_coloured(reference, len(groups[reference]))}?",
                _RELATION_ANSWERS[where],
            )
        )
    if text is not None:
        candidates.append(Question("text", f"What {text.kind} is written in the image?", text.text))
        candidates.append(Question("text_colour", f"What colour is the {text.kind}?", text.colour))
    return tuple(candidates)
