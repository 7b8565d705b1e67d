"""Sample images for trying the portal: varied colours, sizes, shapes and textures, generated once under the
media root (``samples/``) so tasks can reference them like any uploaded file."""

from __future__ import annotations

import random
from pathlib import Path

from django.conf import settings
from PIL import Image, ImageDraw

SAMPLE_DIR = "samples"
# (name, size, background, pattern, accent)
SAMPLES = [
    ("sunset-gradient", (1200, 800), (250, 120, 40), "gradient", (60, 20, 90)),
    ("night-sky", (1600, 900), (10, 15, 40), "dots", (240, 240, 200)),
    ("forest-stripes", (800, 1200), (30, 110, 50), "stripes", (120, 80, 40)),
    ("ocean-square", (1000, 1000), (20, 90, 170), "waves", (230, 240, 250)),
    ("snow-field", (1920, 1080), (240, 242, 245), "plain", (200, 205, 210)),
    ("lemon-banner", (2400, 600), (245, 220, 40), "stripes", (40, 40, 40)),
    ("rose-portrait", (600, 900), (220, 80, 130), "circles", (250, 200, 220)),
    ("charcoal-texture", (640, 640), (50, 50, 55), "noise", (90, 90, 95)),
    ("sky-and-grass", (1280, 720), (120, 180, 240), "horizon", (60, 150, 60)),
    ("purple-checker", (512, 512), (110, 50, 160), "checker", (250, 250, 250)),
    ("teal-thumbnail", (160, 120), (20, 150, 150), "plain", (20, 150, 150)),
    ("traffic-light", (400, 1000), (30, 30, 30), "lights", (0, 0, 0)),
]


def _draw(size, background, pattern, accent, seed) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    rng = random.Random(seed)
    if pattern == "gradient":
        for y in range(height):
            t = y / height
            colour = tuple(int(background[i] * (1 - t) + accent[i] * t) for i in range(3))
            draw.line([(0, y), (width, y)], fill=colour)
    elif pattern == "dots":
        for _ in range(400):
            x, y, r = rng.randrange(width), rng.randrange(height), rng.randint(1, 3)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=accent)
    elif pattern == "stripes":
        for x in range(0, width, 80):
            draw.rectangle([x, 0, x + 30, height], fill=accent)
    elif pattern == "waves":
        for y in range(0, height, 60):
            draw.arc([0, y, width, y + 80], 0, 180, fill=accent, width=6)
    elif pattern == "circles":
        for radius in range(min(size) // 2, 20, -60):
            draw.ellipse([width // 2 - radius, height // 2 - radius, width // 2 + radius, height // 2 + radius],
                         outline=accent, width=12)
    elif pattern == "noise":
        for _ in range(width * height // 8):
            value = rng.randint(-40, 40)
            draw.point((rng.randrange(width), rng.randrange(height)),
                       fill=tuple(max(0, min(255, c + value)) for c in accent))
    elif pattern == "horizon":
        draw.rectangle([0, height * 2 // 3, width, height], fill=accent)
        draw.ellipse([width - 260, 60, width - 120, 200], fill=(250, 230, 80))
    elif pattern == "checker":
        step = 64
        for y in range(0, height, step):
            for x in range(0, width, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=accent)
    elif pattern == "lights":
        for index, colour in enumerate([(220, 30, 30), (240, 190, 20), (40, 190, 60)]):
            centre = height * (index + 1) // 4
            draw.ellipse([width // 2 - 120, centre - 120, width // 2 + 120, centre + 120], fill=colour)
    return image


def ensure_samples() -> list[str]:
    """Writes any missing sample image and returns their media-root references."""
    directory = Path(settings.MEDIA_ROOT) / SAMPLE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    references = []
    for index, (name, size, background, pattern, accent) in enumerate(SAMPLES):
        path = directory / f"{name}.png"
        if not path.exists():
            temporary = path.with_suffix(".tmp")
            _draw(size, background, pattern, accent, seed=index).save(temporary, format="PNG")
            temporary.replace(path)
        references.append(f"{SAMPLE_DIR}/{path.name}")
    return references
