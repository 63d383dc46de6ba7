"""Reference objects made with transformers for the tests: tiny random SmolVLM checkpoints (in the processor
file layout of transformers 4.x or of 5.x), transformers' SmolVLM processor, and prompt layouts."""

from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

IMG = 49190
TOKENS_PER_TILE = 4

TINY_TEXT = dict(
    model_type="llama", vocab_size=49280, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8)
# the image processor of the tiny checkpoints: images resized to a 96 px longest edge, cut into 32 px tiles
TINY_IMAGE = dict(size={"longest_edge": 96}, max_image_size={"longest_edge": 32})


@contextmanager
def without_torchvision_checks():
    """transformers' SmolVLMProcessor wants a video processor, which transformers only builds through torchvision
    (not installed: PyPI's builds don't load with the pinned CPU torch). Inside this block the processor takes
    transformers' own SmolVLMVideoProcessor class (it constructs fine without torchvision; only its video decoding
    needs it), so that the rest (image processor, tokenizer, processor_config.json) runs transformers' real code."""
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def check_but_video(self, name, arg):
        return None if name == "video_processor" else check(self, name, arg)

    with (mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check_but_video),
          mock.patch.object(AutoVideoProcessor, "from_pretrained", SmolVLMVideoProcessor.from_pretrained)):
        yield


def hf_auto_processor(folder: Path):
    """transformers' AutoProcessor.from_pretrained(folder) (a SmolVLMProcessor)."""
    from transformers import AutoProcessor

    with without_torchvision_checks():
        return AutoProcessor.from_pretrained(folder)


def save_hf_processor(folder: Path, tokenizer_dir: Path, image_seq_len: int = TOKENS_PER_TILE):
    """SmolVLMProcessor.save_pretrained as transformers 5.x does it: processor_config.json with the image and video
    processors nested, chat_template.jinja, no preprocessor_config.json."""
    from transformers import AutoTokenizer
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    from smolvlm.processing import SMOLVLM_CHAT_TEMPLATE

    with without_torchvision_checks():
        proc = SmolVLMProcessor(image_processor=SmolVLMImageProcessorPil(**TINY_IMAGE),
                                tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
                                video_processor=SmolVLMVideoProcessor(), image_seq_len=image_seq_len,
                                chat_template=SMOLVLM_CHAT_TEMPLATE)
    proc.save_pretrained(folder)
    return proc


def make_hf_smolvlm(folder: Path, tokenizer_dir: Path, seed: int = 0, tie: bool = False, processor_layout="4.x"):
    """A tiny random SmolVLM saved by transformers, with a real tokenizer and image processor config.
    Tiles of 32 px, 8 px patches, scale factor 2 -> 4 image tokens per tile. processor_layout "4.x": the
    tokenizer files, preprocessor_config.json and a processor_config.json with image_seq_len only (the released
    SmolVLM checkpoints); "5.x": what SmolVLMProcessor.save_pretrained writes today (save_hf_processor)."""
    import shutil

    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    torch.manual_seed(seed)
    cfg = SmolVLMConfig(text_config=dict(TINY_TEXT, tie_word_embeddings=tie), vision_config=TINY_VISION,
                        scale_factor=2, image_token_id=49190, tie_word_embeddings=tie)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers' init leaves some tensors at 0/1; make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    if processor_layout == "5.x":
        save_hf_processor(folder, tokenizer_dir)
        return model
    assert processor_layout == "4.x", processor_layout
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    SmolVLMImageProcessorPil(**TINY_IMAGE).save_pretrained(folder)
    (folder / "processor_config.json").write_text('{"image_seq_len": 4, "processor_class": "SmolVLMProcessor"}')
    return model


def prompt_ids(n_tiles_per_image: list[int], text_before=(11126, 42), text_after=(9519, 9531, 42)):
    """Token ids with one block of <image> tokens per image (the layout is the processor's business)."""
    ids = list(text_before)
    for n in n_tiles_per_image:
        ids += [49189] + [IMG] * (TOKENS_PER_TILE * n) + [49189, 198]
    return torch.tensor([ids + list(text_after)])
