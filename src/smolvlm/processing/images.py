"""Images for SmolVLM: one loader (EXIF rotation, transparency over white), the resizes and tiling of
transformers' SmolVLM image processor, and the rescale + normalize that give pixel_values bit for bit.

Per image (every resize is a PIL resize of a uint8 RGB image with the config's filter, LANCZOS):
  1. to RGB; images with transparency (an "A" band or a `transparency` entry) are put over white
  2. resize so that the longest edge is `longest_edge` (up or down); the other edge is made even
  3. resize up to multiples of the tile size `max_image_size`
  4. cut into rows x cols tiles + the whole image squeezed into one tile (the "global image");
     an image that is already a single tile stays one frame (rows = cols = 0)
  5. rescale (x * 1/255 in float64, stored as float32), normalize ((x - mean) / std in float32)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from smolvlm.errors import SmolVLMError

MAX_IMAGE_SIZE = 4096  # transformers caps any resize at 4k per side



@dataclass
class ImageProcessingConfig:
    """Mirrors the image processor settings of SmolVLM checkpoints (preprocessor_config.json, or the "image_processor"
    entry of processor_config.json in the layout transformers 5.x saves; defaults: SmolVLM-256M)."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    longest_edge: int = 2048  # size["longest_edge"]
    max_image_size: int = 512  # max_image_size["longest_edge"] == the vision encoder's tile size
    resample: int = 1  # PIL.Image.LANCZOS
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_image_splitting: bool = True
    do_pad: bool = True

    @classmethod
    def from_dict(cls, d: dict, source: str = "preprocessor config") -> ImageProcessingConfig:
        """From an image processor dict (preprocessor_config.json, or processor_config.json's "image_processor"
        entry); keys that don't change the pixels are ignored. source names the file in error messages."""
        if not isinstance(d, dict):
            raise SmolVLMError(f"{source} should be a JSON object, got {type(d).__name__}")

        def bad(key: str, v: Any, want: str) -> SmolVLMError:
            return SmolVLMError(f"{source}: {key}={json.dumps(v, default=str)} is not supported; {want}")

        kw: dict[str, Any] = {}
        for f in fields(cls):
            v = d.get(f.name)
            if f.name.startswith("do_") and v is not None:
                if not isinstance(v, bool):
                    raise bad(f.name, v, "expected true or false")
                kw[f.name] = v
        for key, out in (("size", "longest_edge"), ("max_image_size", "max_image_size")):
            v = d.get(key)
            if isinstance(v, dict):
                if "longest_edge" not in v:
                    raise bad(key, v, 'SmolVLM needs {"longest_edge": N}')
                v = v["longest_edge"]
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:  # bool is an int to Python
                raise bad(key, d[key], 'expected {"longest_edge": N} with N a positive integer')
            kw[out] = v
        if d.get("resample") is not None:
            v = d["resample"]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 5:
                raise bad("resample", v, "expected a PIL resampling filter number, 0 to 5")
            kw["resample"] = v
        if d.get("rescale_factor") is not None:
            v = d["rescale_factor"]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad("rescale_factor", v, "expected a number")
            kw["rescale_factor"] = float(v)
        for key in ("image_mean", "image_std"):  # a single number means the same for the 3 channels
            v = d.get(key)
            if v is None:
                continue
            values = v if isinstance(v, (list, tuple)) else [v] * 3
            if len(values) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
                raise bad(key, v, "expected 3 numbers (RGB) or one number")
            kw[key] = tuple(float(x) for x in values)
        cfg = cls(**kw)
        cfg.check()
        return cfg

    def to_dict(self) -> dict:
        """A preprocessor_config.json that transformers' SmolVLMImageProcessor(Pil) loads."""
        d = asdict(self)
        d["size"] = {"longest_edge": d.pop("longest_edge")}
        d["max_image_size"] = {"longest_edge": d.pop("max_image_size")}
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        d["image_processor_type"] = "SmolVLMImageProcessor"
        d["processor_class"] = "SmolVLMProcessor"
        return d

    def check(self) -> None:
        if self.max_image_size <= 0 or self.longest_edge <= 0:
            raise SmolVLMError(f"image sizes must be positive (longest_edge={self.longest_edge}, "
                               f"max_image_size={self.max_image_size})")


def open_image(path: str | Path) -> Image.Image:
    """Read an image file fully (so a truncated file fails here, not later) and turn it upright
    (EXIF orientation), as transformers' `load_image` does. The mode is kept: RGB conversion
    (transparency over white) is the processor's job."""
    p = Path(path)
    if not p.exists():
        raise SmolVLMError(f"image file {p} does not exist; check the path")
    if not p.is_file():
        raise SmolVLMError(f"{p} is not a file; pass the path of an image file")
    try:
        img = Image.open(p)
    except UnidentifiedImageError:
        raise SmolVLMError(f"{p} is not an image Pillow can read (unsupported format or not an image); "
                           "convert it to PNG or JPEG") from None
    except Image.DecompressionBombError as e:
        raise SmolVLMError(f"{p} is too large to open safely ({e}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SmolVLMError(f"image {p} is corrupt or unreadable ({e}); check the file, or re-export it") from None
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SmolVLMError(f"image {p} is corrupt or truncated ({e}); re-export or re-download it") from None
    return img


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparent images (an "A" band, or a palette/tRNS transparency)
    are composited over white, everything else goes through PIL's convert("RGB")."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise SmolVLMError(f"cannot convert a {image.mode!r} image to RGB ({e}); save it as an RGB PNG or JPEG"
                           ) from None


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(h, w) with the longest edge == longest_edge, the other edge truncated then made even; then
    both capped at 4096. The float expressions are transformers' own (w / (w / h), not w * h / w)."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # _resize_output_size_scale_below_upper_bound
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def tile_grid_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(h, w) rounded up to multiples of the tile; the short edge follows the long edge's new aspect."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    return image.resize((width, height), resample=resample)


def image_frames(image: Image.Image, cfg: ImageProcessingConfig) -> tuple[list[np.ndarray], int, int]:
    """One image -> its frames (each (h, w, 3) uint8: rows*cols tiles then the global image, or one
    frame), rows, cols."""
    if not isinstance(image, Image.Image):
        raise SmolVLMError(f"images must be PIL images or file paths, got {type(image).__name__}")
    if cfg.do_convert_rgb:
        image = to_rgb(image)
    elif image.mode != "RGB":
        raise SmolVLMError(f"a {image.mode!r} image needs RGB conversion; set do_convert_rgb=True")
    r, tile = cfg.resample, cfg.max_image_size
    if cfg.do_resize:
        image = resize(image, *longest_edge_size(image.height, image.width, cfg.longest_edge), r)
    if not cfg.do_image_splitting:
        return [np.asarray(resize(image, tile, tile, r))], 0, 0
    image = resize(image, *tile_grid_size(image.height, image.width, tile), r)
    h, w = image.height, image.width
    if h <= tile and w <= tile:
        return [np.asarray(image)], 0, 0
    rows, cols = (h - tile) // tile + 1, (w - tile) // tile + 1
    pixels = np.asarray(image)  # (h, w, 3)
    frames = [pixels[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] for i in range(rows) for j in range(cols)]
    frames.append(np.asarray(resize(image, tile, tile, r)))  # the global image
    return frames, rows, cols


def normalize_frame(frame: np.ndarray, cfg: ImageProcessingConfig) -> np.ndarray:
    """(h, w, 3) uint8 -> (3, h, w) float32 with transformers' exact dtypes: the rescale multiplies in
    float64 and stores float32; the normalize subtracts and divides in float32."""
    x = frame.transpose(2, 0, 1)
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        mean = np.array(cfg.image_mean, dtype=x.dtype)[:, None, None]
        std = np.array(cfg.image_std, dtype=x.dtype)[:, None, None]
        x = (x - mean) / std
    return x.astype(np.float32, copy=False)


def nest_images(images: Any, n_texts: int) -> list[list[Any]]:
    """None | image | [image, ...] (one prompt) | [[image, ...], ...] (one list per prompt)."""
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, Path)):
        return [[images]]
    images = list(images)
    if images and all(isinstance(x, (list, tuple)) for x in images):
        return [list(x) for x in images]
    if any(isinstance(x, (list, tuple)) for x in images):
        raise SmolVLMError("images must be one list of images per prompt (or a flat list for one prompt)")
    if n_texts > 1:
        raise SmolVLMError(f"got {n_texts} prompts and a flat list of images; pass one list of images per prompt")
    return [images]


