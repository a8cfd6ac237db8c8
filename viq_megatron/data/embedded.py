"""The embedded default images: real photos that ship inside installed packages.

No downloads: scikit-image, scikit-learn and matplotlib carry these files in their
wheels (mostly public domain; scikit-learn's two are CC-BY). Found by path, so the
files are read exactly as they ship.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
        raise FileNotFoundError("no embedded photos found: install the data extra "
                                "(scikit-image, scikit-learn, matplotlib) or set data.images")
    return paths
