"""The embedded default images: real photos that ship inside installed packages.

No downloads: scikit-image, scikit-learn and matplotlib carry these files in their
wheels (mostly public domain; scikit-learn's two are CC-BY). Found by path, so the
files are read exactly as they ship.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from viq_megatron.config import EmbeddedDataConfig
from viq_megatron.data.scenes import grounded_caption, render_scene, scene_split

# (package, path inside the package) -> a short caption, written by hand.
SHIPPED_PHOTOS: dict[tuple[str, str], str] = {
    ("skimage", "data/astronaut.png"): "Astronaut Eileen Collins in a white flight suit, with a US flag behind her.",
    ("skimage", "data/chelsea.png"): "A tabby cat named Chelsea looking to the side.",
    ("skimage", "data/coffee.png"): "A cup of coffee on a saucer with a spoon, seen from above.",
    ("skimage", "data/rocket.jpg"): "A rocket standing on its launch pad under a blue sky.",
    ("skimage", "data/hubble_deep_field.jpg"): "The Hubble deep field: many small galaxies on a black sky.",
    ("skimage", "data/retina.jpg"): "A photograph of the human retina with its blood vessels.",
    ("skimage", "data/motorcycle_left.png"): "A red motorcycle parked in a cluttered garage.",
    ("skimage", "data/camera.png"): "A black and white photo of a man with a camera on a tripod.",
    ("skimage", "data/coins.png"): "Greek coins laid out in rows on a dark background.",
    ("skimage", "data/moon.png"): "A grey close-up of the surface of the moon.",
    ("sklearn", "datasets/images/china.jpg"): "A Chinese temple with a curved roof among trees.",
    ("sklearn", "datasets/images/flower.jpg"): "A pink flower in close-up with green leaves.",
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"): "A portrait of Grace Hopper in navy uniform.",
}


def shipped_photos() -> list[Path]:
    """Paths of the shipped photos whose package is installed, in a fixed order."""
    paths = []
    for package, relative in SHIPPED_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        path = Path(spec.origin).parent / relative
        if path.is_file():
            paths.append(path)
    if not paths:
        raise FileNotFoundError(
            "no embedded photos found: install the data extra "
            "(scikit-image, scikit-learn, matplotlib) or set data.images"
        )
    return paths


# Prompts for the embedded dataset's captions, cycled deterministically.
CAPTION_PROMPTS = (
    "Describe the image.",
    "What do you see in this picture?",
    "Write a short caption.",
    "Describe this image in one or two sentences.",
)
GROUNDED_PROMPT = "List what is where."
# The last shipped photos are held out for validation.
VALIDATION_PHOTOS = 3


def _conversation(image: str, prompt: str, answer: str, qa: tuple = ()) -> dict:
    turns = [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]
    for question, reply in qa:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
    return {"image": image, "conversations": turns}


def write_embedded_dataset(out_dir: str | Path, sizes: EmbeddedDataConfig, seed: int) -> tuple[Path, Path]:
    """Writes train.jsonl / val.jsonl and their images (rendered scenes + shipped photos).

    Training samples carry the caption and the scene's question/answer pairs (each training
    photo `sizes.photo_repeats` times); validation samples carry the caption alone, so
    validation loss is a caption loss. Deterministic; a complete earlier write is reused.
    """
    out = Path(out_dir)
    train_file, val_file = out / "train.jsonl", out / "val.jsonl"
    stamp = out / "COMPLETE"
    wanted = f"{sizes.train_scenes} {sizes.val_scenes} {seed} {sizes.photo_repeats} {sizes.scene_text}"
    if stamp.is_file() and stamp.read_text() == wanted:
        return train_file, val_file
    (out / "images").mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = scene_split(sizes.train_scenes, sizes.val_scenes, seed)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        for index in ids:
            scene = render_scene(index, seed)
            name = f"images/scene_{index}.png"
            scene.image.save(out / name)
            prompt = CAPTION_PROMPTS[index % len(CAPTION_PROMPTS)]
            if sizes.scene_text == "grounded":
                splits[split].append(_conversation(name, GROUNDED_PROMPT, grounded_caption(scene)))
            else:
                splits[split].append(_conversation(name, prompt, scene.caption, scene.qa if split == "train" else ()))
    photos = shipped_photos()
    captions = {Path(p).name: c for (_, p), c in SHIPPED_PHOTOS.items()}
    for k, photo in enumerate(photos):
        name = f"images/{photo.name}"
        shutil.copyfile(photo, out / name)
        split = "val" if k >= len(photos) - VALIDATION_PHOTOS else "train"
        repeats = sizes.photo_repeats if split == "train" else 1
        splits[split] += [
            _conversation(name, CAPTION_PROMPTS[k % len(CAPTION_PROMPTS)], captions[photo.name])
        ] * repeats
    for file, split in ((train_file, "train"), (val_file, "val")):
        tmp = file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(s) + "\n" for s in splits[split]))
        os.replace(tmp, file)
    stamp.write_text(wanted)
    return train_file, val_file
