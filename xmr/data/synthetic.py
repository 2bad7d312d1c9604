"""A tiny synthetic image-caption set: coloured shapes on plain backgrounds, for tests and smoke runs."""
from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .flickr8k import ImageCaptionSplit

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 210, 30), "orange": (245, 140, 20), "purple": (140, 50, 170),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
CAPTION_TEMPLATES = (  # {a_colour}: the colour with its article, "a red" / "an orange"
    "{a_colour} {shape} on a {background} background",
    "a picture of {a_colour} {shape} against {background}",
    "a {background} image with {a_colour} {shape} in it",
    "one {colour} {shape} drawn on a plain {background} backdrop",
    "a simple {shape} coloured {colour} over a {background} background",
)


def draw_shape(shape: str, colour: str, background: str, size: int, rng: random.Random) -> Image.Image:
    """A ``size`` x ``size`` RGB image of one shape at a random position and scale."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    radius = rng.uniform(size / 6, size / 3)
    centre_x, centre_y = (rng.uniform(radius, size - radius) for _ in range(2))
    box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(centre_x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=COLOURS[colour])
    return image


def make_synthetic_image_captions(directory: str | os.PathLike, num_images: int = 40, captions_per_image: int = 5,
                                  seed: int = 0, size: int = 64) -> ImageCaptionSplit:
    """Write ``num_images`` PNGs of coloured shapes under ``directory`` and return them with their captions.

    The same arguments give byte-identical files. Images cycle through a seeded shuffle of every
    (shape, colour, background) combination, so up to 54 images have distinct descriptions.
    """
    if not 1 <= captions_per_image <= len(CAPTION_TEMPLATES):
        raise ValueError(f"captions_per_image must be in 1..{len(CAPTION_TEMPLATES)}, got {captions_per_image}")
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    rng = random.Random(seed)
    combinations = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS))
    rng.shuffle(combinations)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    image_ids, image_paths, captions = [], [], []
    for index in range(num_images):
        shape, colour, background = combinations[index % len(combinations)]
        # The seed and size are in the name, so sets made with different arguments never share an image id.
        image_id = f"shape_{index:04d}_seed{seed}_{size}px.png"
        draw_shape(shape, colour, background, size, rng).save(directory / image_id, format="PNG")
        image_ids.append(image_id)
        image_paths.append(directory / image_id)
        a_colour = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour}"
        captions.extend(template.format(shape=shape, colour=colour, a_colour=a_colour, background=background)
                        for template in CAPTION_TEMPLATES[:captions_per_image])
    return ImageCaptionSplit(
        dataset="synthetic",
        split=f"seed{seed}",
        image_ids=tuple(image_ids),
        image_paths=tuple(image_paths),
        captions=tuple(captions),
        captions_per_image=captions_per_image,
    )
