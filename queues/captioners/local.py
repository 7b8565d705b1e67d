"""The default captioner: a deterministic alt text computed from the pixels with Pillow.

It says what a person who cannot see the image would want first: shape and size, the dominant colours and how
much of the image each covers, brightness, contrast and how much detail there is. The same image always gets the
same text, which makes it useful both as a fallback and in tests.
"""

from __future__ import annotations

import colorsys
import io
import warnings

from django.conf import settings
from PIL import Image, ImageFilter, ImageStat, UnidentifiedImageError

from queues.captioners import Captioner
from queues.captioners.fetch import fetch_image
from queues.errors import PermanentCaptionError

ANALYSIS_SIZE = (160, 160)
HUE_NAMES = [  # (upper bound of the hue in degrees, name)
    (15, "red"), (40, "orange"), (65, "yellow"), (80, "lime green"), (160, "green"), (190, "teal"),
    (250, "blue"), (285, "purple"), (345, "pink"), (361, "red"),
]


def colour_name(rgb: tuple[int, int, int]) -> str:
    red, green, blue = (channel / 255 for channel in rgb)
    hue, lightness, saturation = colorsys.rgb_to_hls(red, green, blue)
    chroma = max(rgb) - min(rgb)  # HLS saturation overstates the colour of very dark and very light pixels
    if chroma < 32 or saturation < 0.15 or lightness < 0.16 or lightness > 0.93:
        if lightness < 0.16:
            return "black"
        if lightness > 0.9:
            return "white"
        return "dark grey" if lightness < 0.4 else ("light grey" if lightness > 0.7 else "grey")
    degrees = hue * 360
    name = next(label for bound, label in HUE_NAMES if degrees < bound)
    if name == "orange" and lightness < 0.35:
        return "brown"
    if lightness < 0.3:
        return f"dark {name}"
    if lightness > 0.72:
        return f"light {name}"
    return name


def dominant_colours(image: Image.Image, limit: int = 3) -> list[tuple[str, float]]:
    """Named colours covering at least 4 % of the image, largest first, as (name, share)."""
    quantized = image.quantize(colors=8, method=Image.Quantize.MEDIANCUT)
    palette = quantized.getpalette()
    total = image.width * image.height
    shares: dict[str, float] = {}
    for count, index in quantized.getcolors(maxcolors=256) or []:
        rgb = tuple(palette[index * 3:index * 3 + 3])
        name = colour_name(rgb)
        shares[name] = shares.get(name, 0.0) + count / total
    ranked = sorted(shares.items(), key=lambda item: (-item[1], item[0]))
    return [(name, share) for name, share in ranked if share >= 0.04][:limit]


def describe_level(value: float, levels: list[tuple[float, str]]) -> str:
    return next(label for bound, label in levels if value < bound)


def describe(image: Image.Image, *, original_size: tuple[int, int], has_transparency: bool) -> str:
    width, height = original_size
    ratio = width / height
    if ratio >= 2.0:
        shape = "Panoramic"
    elif ratio > 1.1:
        shape = "Landscape"
    elif ratio < 0.5:
        shape = "Tall"
    elif ratio < 0.9:
        shape = "Portrait"
    else:
        shape = "Square"
    size = "small " if width * height < 100_000 else ("large " if width * height > 4_000_000 else "")

    colours = dominant_colours(image)
    if colours:
        (first, first_share), rest = colours[0], colours[1:]
        if first_share > 0.9:
            colour_text = f"almost entirely {first}"
        else:
            colour_text = f"mostly {first} ({first_share:.0%})"
            if rest:
                colour_text += " with " + " and ".join(f"{name} ({share:.0%})" for name, share in rest)
    else:
        colour_text = "many colours with none dominant"

    grey = image.convert("L")
    stats = ImageStat.Stat(grey)
    brightness = describe_level(stats.mean[0] / 255, [
        (0.2, "very dark"), (0.4, "dark"), (0.6, "medium brightness"), (0.8, "bright"), (1.01, "very bright")])
    contrast = describe_level(stats.stddev[0], [(18, "low contrast"), (55, "moderate contrast"),
                                                (1000, "high contrast")])
    edges_image = grey.filter(ImageFilter.FIND_EDGES)
    if edges_image.width > 2 and edges_image.height > 2:  # the filter marks the frame itself as an edge
        edges_image = edges_image.crop((1, 1, edges_image.width - 1, edges_image.height - 1))
    edges = ImageStat.Stat(edges_image).mean[0]
    detail = describe_level(edges, [(3, "smooth, plain areas"), (12, "some detail"),
                                    (1000, "a lot of fine detail or texture")])
    transparency = ", with transparent areas" if has_transparency else ""
    return (f"{shape} {size}image ({width}×{height} px){transparency}, {colour_text}. "
            f"Overall {brightness}, {contrast}, {detail}.")


def open_image(data: bytes) -> Image.Image:
    """Opens and sanity-checks image bytes. Raises PermanentCaptionError for anything we should not decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > settings.IMAGE_MAX_PIXELS:
                raise PermanentCaptionError(
                    f"image is {image.width}×{image.height} px, more than the limit of "
                    f"{settings.IMAGE_MAX_PIXELS} pixels")
            image.load()
    except PermanentCaptionError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise PermanentCaptionError(f"not a readable image: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise PermanentCaptionError(f"the image data is damaged or incomplete: {error}") from error
    return image


class LocalCaptioner(Captioner):
    name = "local"

    def caption(self, image_ref: str, *, timeout: float) -> str:
        data = fetch_image(image_ref, timeout=min(timeout, settings.IMAGE_FETCH_TIMEOUT))
        return self.caption_bytes(data)

    def caption_bytes(self, data: bytes) -> str:
        image = open_image(data)
        original_size = image.size
        has_transparency = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        if has_transparency:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        small = image.convert("RGB")
        small.thumbnail(ANALYSIS_SIZE)
        return describe(small, original_size=original_size, has_transparency=has_transparency)
