"""SmolVLM's processor: images -> tiles -> pixel_values, prompts -> image-token blocks -> input_ids.

A flat re-implementation of transformers' `SmolVLMProcessor` + `SmolVLMImageProcessorPil` (v5.24) that
gives the same tensors bit for bit, with only pillow, numpy, torch, tokenizers and jinja2.

images.py: the one image loader and the pixels (each step listed there); chat_template.py: templates and chat
messages; processor.py: the Processor (image-token blocks, tokens, padding the batch's frames, reading and
writing a checkpoint's processor files).
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
