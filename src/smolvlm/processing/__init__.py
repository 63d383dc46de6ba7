"""SmolVLM's processor: images -> tiles -> pixel_values, prompts -> image-token blocks -> input_ids.

A flat re-implementation of transformers' `SmolVLMProcessor` + `SmolVLMImageProcessorPil` (v5.24) that
gives the same tensors bit for bit, with only pillow, numpy, torch, tokenizers and jinja2.

Pixels, per image (every resize is a PIL resize of a uint8 RGB image with the config's filter, LANCZOS):
  1. to RGB; images with transparency (an "A" band or a `transparency` entry) are put over white
  2. resize so that the longest edge is `longest_edge` (up or down); the other edge is made even
  3. resize up to multiples of the tile size `max_image_size`
  4. cut into rows x cols tiles + the whole image squeezed into one tile (the "global image");
     an image that is already a single tile stays one frame (rows = cols = 0)
  5. rescale (x * 1/255 in float64, stored as float32), normalize ((x - mean) / std in float32)
  6. pad each prompt's frames to the batch's largest count with zero frames; pixel_attention_mask
     marks the real pixels
Text: each `<image>` becomes `<fake_token_around_image><row_r_col_c><image>*image_seq_len` per tile
(a newline after each row), then `\n<fake_token_around_image><global-img><image>*n<fake_token_around_image>`.

images.py: the one image loader and the pixels; chat_template.py: templates and chat messages; processor.py: the
Processor (tokens, image-token blocks, reading and writing a checkpoint's processor files).
"""

from smolvlm.processing.chat_template import SMOLVLM_CHAT_TEMPLATE, build_messages, compile_chat_template
from smolvlm.processing.images import (
    MAX_IMAGE_SIZE,
    ImageProcessingConfig,
    image_frames,
    longest_edge_size,
    nest_images,
    normalize_frame,
    open_image,
    resize,
    tile_grid_size,
    to_rgb,
)
from smolvlm.processing.processor import Processor, processor_config_dict, read_image_config

__all__ = [
    "MAX_IMAGE_SIZE", "SMOLVLM_CHAT_TEMPLATE", "ImageProcessingConfig", "Processor", "build_messages",
    "compile_chat_template", "image_frames", "longest_edge_size", "nest_images", "normalize_frame", "open_image",
    "processor_config_dict", "read_image_config", "resize", "tile_grid_size", "to_rgb",
]
