import hashlib
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from viq_megatron.data.scenes import (
    BACKGROUND_COLOURS,
    COLOURS,
    OBJECT_COLOURS,
    SHAPES,
    Scene,
    grounded_caption,
    render_scene,
    scene_split,
)

ROOT = Path(__file__).resolve().parents[1]
SCENES = [render_scene(i) for i in range(200)]
NUMBER_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5}
# Share of a shape's tight box that its pixels cover: circle pi/4, triangle 1/2, five-point star with
# inner radius 0.45 of the outer about 0.38; bounds leave room for pixel rounding on small shapes.
FILL_RANGE = {
    "square": (1.0, 1.0),
    "rectangle": (1.0, 1.0),
    "circle": (0.72, 0.82),
    "triangle": (0.48, 0.58),
    "star": (0.33, 0.47),
}


def centre(bbox):
    x0, y0, x1, y1 = bbox
    return (x0 + x1) / 2, (y0 + y1) / 2


def group(scene: Scene, colour: str, shape: str):
    members = [o for o in scene.objects if o.colour == colour and o.shape == shape]
    assert members, f"{scene.caption!r} names {colour} {shape}s that are not in the scene"
    return members


def side_of(subjects, references) -> str | None:
    """The sides ("left", "above", ...) on which every subject lies relative to every reference,
    judged from box centres."""
    xs, ys = [centre(o.bbox)[0] for o in subjects], [centre(o.bbox)[1] for o in subjects]
    ref_xs, ref_ys = [centre(o.bbox)[0] for o in references], [centre(o.bbox)[1] for o in references]
    margin = 4
    sides = []
    if max(xs) + margin < min(ref_xs):
        sides.append("left")
    if min(xs) > max(ref_xs) + margin:
        sides.append("right")
    if max(ys) + margin < min(ref_ys):
        sides.append("above")
    if min(ys) > max(ref_ys) + margin:
        sides.append("below")
    return sides


def expected_answer(scene: Scene, question: str) -> str:
    """The answer worked out from the scene's object list, independently of the generator's text."""
    shapes = Counter(o.shape for o in scene.objects)
    if question == "What is the background colour?":
        return " and ".join(scene.background)
    if question == "How many shapes are there?":
        return str(len(scene.objects))
    if question == "Is there any text in the image?":
        return "yes" if scene.text else "no"
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        assert m[1] in OBJECT_COLOURS and m[1] not in scene.background
        return str(sum(o.colour == m[1] for o in scene.objects))
    if m := re.fullmatch(r"What colour (is|are) the (\w+?)s?\?", question):
        if m[2] in ("word", "number"):
            assert scene.text and scene.text.kind == m[2]
            return scene.text.colour
        colours = {o.colour for o in scene.objects if o.shape == m[2]}
        assert len(colours) == 1 and (m[1] == "is") == (shapes[m[2]] == 1), question
        return colours.pop()
    if m := re.fullmatch(r"What (word|number) is written in the image\?", question):
        assert scene.text and scene.text.kind == m[1]
        return scene.text.text
    if m := re.fullmatch(r"What shape (is|are) the (\w+) objects?\?", question):
        of_colour = [o for o in scene.objects if o.colour == m[2]]
        kinds = {o.shape for o in of_colour}
        assert len(kinds) == 1 and (m[1] == "is") == (len(of_colour) == 1), question
        return kinds.pop()
    if m := re.fullmatch(
        r"(Is|Are) the (\w+) objects? (left or right of|above or below) the (\w+) objects?\?", question
    ):
        subjects, references = ([o for o in scene.objects if o.colour == c] for c in (m[2], m[4]))
        assert subjects and references and (m[1] == "Is") == (len(subjects) == 1), question
        sides = side_of(subjects, references)
        options = m[3].removesuffix(" of").split(" or ")
        matching = [s for s in sides if s in options]
        assert len(matching) == 1, question
        return matching[0]
    raise AssertionError(f"unknown question template: {question!r}")


def test_same_index_and_seed_render_identically():
    a, b = render_scene(17, seed=3), render_scene(17, seed=3)
    assert a.image.tobytes() == b.image.tobytes() and a.image.size == b.image.size
    assert (a.caption, a.qa, a.objects, a.text, a.background) == (b.caption, b.qa, b.objects, b.text, b.background)
    assert render_scene(18, seed=3).image.tobytes() != a.image.tobytes()
    assert render_scene(17, seed=4).image.tobytes() != a.image.tobytes()
    assert len({s.caption for s in SCENES}) > 150


def test_render_is_the_same_in_a_fresh_process_and_does_not_import_matplotlib():
    indices = [0, 5, 42, 10**12 + 3]
    script = (
        "import hashlib, sys\n"
        "from viq_megatron.data.scenes import render_scene\n"
        f"for i in {indices}:\n"
        "    s = render_scene(i, seed=7)\n"
        "    print(hashlib.sha256(s.image.tobytes()).hexdigest(), repr(s.caption), repr(s.qa))\n"
        "print('matplotlib' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
    ).stdout.splitlines()
    here = [
        f"{hashlib.sha256(s.image.tobytes()).hexdigest()} {s.caption!r} {s.qa!r}"
        for s in (render_scene(i, seed=7) for i in indices)
    ]
    assert out == [*here, "False"]


def test_sizes_and_aspect_ratios_vary():
    sizes = [s.image.size for s in SCENES]
    assert all(s.image.mode == "RGB" for s in SCENES)
    assert all(96 <= w <= 448 and 96 <= h <= 448 for w, h in sizes)
    assert any(w > 2 * h for w, h in sizes), "no wide scene"
    assert any(h > 2 * w for w, h in sizes), "no tall scene"
    assert any(max(w, h) < 1.1 * min(w, h) for w, h in sizes), "no near-square scene"
    assert any(w > 3.5 * h or h > 3.5 * w for w, h in sizes), "no extreme aspect ratio"


@pytest.mark.parametrize("scene", SCENES[:100], ids=lambda s: s.caption[:40])
def test_objects_are_drawn_where_and_as_stated(scene: Scene):
    pixels = np.asarray(scene.image)
    height, width = pixels.shape[:2]
    background = [COLOURS[name] for name in scene.background]
    assert 1 <= len(scene.objects) <= 5 and set(scene.background) <= set(BACKGROUND_COLOURS)
    boxes = [o.bbox for o in scene.objects] + ([scene.text.bbox] if scene.text else [])
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        for a0, b0, a1, b1 in boxes[i + 1 :]:
            assert x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0, "overlapping boxes"

    for obj in scene.objects:
        assert obj.shape in SHAPES and obj.colour in OBJECT_COLOURS and obj.colour not in scene.background
        x0, y0, x1, y1 = obj.bbox
        crop = pixels[y0:y1, x0:x1]
        own = (crop == COLOURS[obj.colour]).all(-1)
        on_background = np.zeros_like(own)
        for rgb in background:
            on_background |= (crop == rgb).all(-1)
        assert (own | on_background).all(), f"{obj}: stray colours in its box"
        assert own[0].any() and own[-1].any() and own[:, 0].any() and own[:, -1].any(), f"{obj}: box not tight"
        low, high = FILL_RANGE[obj.shape]
        assert low <= own.mean() <= high, f"{obj}: fills {own.mean():.2f} of its box"
        box_w, box_h = x1 - x0, y1 - y0
        if obj.shape == "square":
            assert box_w == box_h
        if obj.shape == "rectangle":
            assert min(box_w, box_h) <= 0.65 * max(box_w, box_h)

    if scene.text:
        x0, y0, x1, y1 = scene.text.bbox
        assert (pixels[y0:y1, x0:x1] == COLOURS[scene.text.colour]).all(-1).any(), "text colour not drawn"
        assert scene.text.colour not in scene.background
    # everything outside the boxes is background
    outside = np.ones((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        outside[y0:y1, x0:x1] = False
    rest = pixels[outside]
    assert np.any([(rest == rgb).all(-1) for rgb in background], axis=0).all()


@pytest.mark.parametrize("scene", SCENES, ids=lambda s: s.caption[:40])
def test_caption_states_counts_text_background_and_a_true_relation(scene: Scene):
    assert len(scene.caption.split()) < 40
    first, *rest = scene.caption.split(". ")
    m = re.fullmatch(r"(.+) on an? (.+) background\.?", first[0].lower() + first[1:])
    assert m, scene.caption
    assert m[2] == " and ".join(scene.background)
    stated_counts, stated_text = Counter(), None
    for item in re.split(r", | and ", m[1]):
        if t := re.fullmatch(r"the (word|number) (\S+) in (\w+)", item):
            stated_text = (t[1], t[2], t[3])
        else:
            o = re.fullmatch(r"(a|an|two|three|four|five) (\w+) (\w+?)s?", item)
            assert o and o[3] in SHAPES, item
            assert o[1] not in ("a", "an") or (o[1] == "an") == (o[2][0] in "aeiou"), item
            stated_counts[(o[2], o[3])] += NUMBER_WORDS[o[1]]
    assert stated_counts == Counter((o.colour, o.shape) for o in scene.objects)
    assert stated_text == ((scene.text.kind, scene.text.text, scene.text.colour) if scene.text else None)

    assert len(rest) <= 1
    if rest:
        r = re.fullmatch(
            r"The (\w+) (\w+?)s? (?:is|are) (to the left of|to the right of|above|below) "
            r"the (\w+) (\w+?)s?\.",
            rest[0],
        )
        assert r, rest[0]
        stated = {"to the left of": "left", "to the right of": "right"}.get(r[3], r[3])
        assert stated in side_of(group(scene, r[1], r[2]), group(scene, r[4], r[5])), scene.caption


@pytest.mark.parametrize("scene", SCENES[:60], ids=lambda s: s.caption[:40])
def test_grounded_caption_lists_every_object_largest_first_where_its_pixels_are(scene: Scene):
    """Parsed back, the dense caption gives the background, the count, and for each object its
    colour and shape in decreasing size, at the grid cell holding the centre of its pixels."""
    pixels = np.asarray(scene.image)
    width, height = scene.image.size
    m = re.fullmatch(r"Background: (.+?)\. (\d) objects?(?:: (.+?))?\.(?: Text: (.+)\.)?", grounded_caption(scene))
    assert m, grounded_caption(scene)
    assert m[1] == " and ".join(scene.background) and int(m[2]) == len(scene.objects)
    listed = [re.fullmatch(r"an? (\w+) (\w+) at (\d) (\d)", item) for item in (m[3] or "").split(", ") if m[3]]
    assert all(listed) and len(listed) == len(scene.objects)
    assert Counter((item[1], item[2]) for item in listed) == Counter((o.colour, o.shape) for o in scene.objects)
    for item in listed:
        # The object is one of its kind whose own pixels are centred in the stated cell.
        cells = []
        for o in (o for o in scene.objects if (o.colour, o.shape) == (item[1], item[2])):
            x0, y0, x1, y1 = o.bbox
            ys, xs = np.nonzero((pixels[y0:y1, x0:x1] == COLOURS[o.colour]).all(-1))
            cx, cy = x0 + (xs.min() + xs.max() + 1) / 2, y0 + (ys.min() + ys.max() + 1) / 2
            cells.append((min(9, int(10 * cx / width)), min(9, int(10 * cy / height))))
        assert (int(item[3]), int(item[4])) in cells, (item[0], cells)
    if listed:  # the first is of the kind with the biggest box
        biggest = max(scene.objects, key=lambda o: (o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]))
        assert (listed[0][1], listed[0][2]) == (biggest.colour, biggest.shape)
    if scene.text is None:
        assert m[4] is None
    else:
        assert m[4].startswith(f"the {scene.text.kind} {scene.text.text} in {scene.text.colour} at ")


def test_answers_follow_from_the_scene():
    questions = []
    for scene in SCENES:
        assert 2 <= len(scene.qa) <= 4 and len(set(scene.qa)) == len(scene.qa)
        for question, answer in scene.qa:
            assert answer == expected_answer(scene, question), (scene.caption, question)
            questions.append(question)
    for kind in [
        "How many shapes",
        r"How many \w+ objects",
        "What colour (is|are) the (circle|square|rectangle|triangle|star)",
        "What colour is the (word|number)",
        "What shape",
        "background colour",
        "any text",
        "What word",
        "What number",
        "left or right of",
        "above or below",
    ]:
        assert any(re.search(kind, q) for q in questions), f"never asked: {kind}"
    assert "0" in [a for s in SCENES for _, a in s.qa], "never asked about an absent colour"


def test_every_question_is_answered_by_the_scene_and_kinds_are_covered():
    """`questions` (the benchmark's): each answer follows from the objects; every kind occurs; a
    colour names one group, so questions that name objects by colour are unambiguous."""
    from viq_megatron.data.scenes import QUESTION_KINDS

    for scene in SCENES:
        assert len({o.colour for o in scene.objects}) == len({(o.colour, o.shape) for o in scene.objects})
        for q in scene.questions:
            assert q.answer == expected_answer(scene, q.question), (scene.caption, q.question)
        assert set(scene.qa) <= {(q.question, q.answer) for q in scene.questions}
    assert {q.kind for s in SCENES for q in s.questions} == set(QUESTION_KINDS)


def test_scene_split_is_disjoint_and_val_is_stable():
    train, val = scene_split(1000, 50)
    assert len(train) == 1000 and len(val) == 50 and not set(train) & set(val)
    bigger_train, same_val = scene_split(100_000, 50)
    assert same_val == val and bigger_train[:1000] == train
    assert scene_split(10, 80)[1][:50] == val
    assert scene_split(1000, 50, seed=9) == (train, val)
    with pytest.raises(ValueError):
        scene_split(-1, 5)


def test_rendering_is_fast():
    start = time.perf_counter()
    for index in range(1000, 1100):
        render_scene(index)
    per_scene = (time.perf_counter() - start) / 100
    assert per_scene < 0.02, f"{per_scene * 1000:.1f} ms per scene"
