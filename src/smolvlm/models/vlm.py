"""The vision-language model: vision encoder -> connector -> image tokens spliced into the decoder.

pixels (B, I, 3, H, W) -> real images (N, 3, H, W) -> VisionEncoder (N, P, Dv)
    -> Connector (N, P/s^2, Dt) -> placed at the `<image>` token positions of the text embeddings
    -> Decoder (B, T, Dt) -> lm_head -> logits (B, T, V)

A model with `vision=None` is a plain language model (e.g. SmolLM2 read from GGUF): same decoder,
no images. Module names follow Hugging Face's SmolVLMForConditionalGeneration minus its `model.`
prefix, so checkpoints map 1:1 (see io/hf_config.py).

Architecture options (defaults: SmolVLM's layout): the CNN encoder, the mlp / ldp connectors, cross-attention
(the prompt keeps one `<image>` marker per tile, the tile's tokens reach the decoder through gated
cross-attention layers: models/cross_attention.py), shared decoder layers (DecoderConfig.layer_repeats),
a contrastive image-text head (models/contrastive.py) and a learned position table added to the connector's
tokens (image_positions).
"""

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from smolvlm.errors import SmolVLMError
from smolvlm.models.cnn import CNNConfig, CNNEncoder
from smolvlm.models.connector import CONNECTORS, make_connector, tokens_per_tile
from smolvlm.models.contrastive import ContrastiveHead
from smolvlm.models.cross_attention import GatedCrossAttentionBlock
from smolvlm.models.decoder import Decoder, DecoderConfig, KVCache, RealTokens
from smolvlm.models.vision import VisionConfig, VisionEncoder


@dataclass
class VLMConfig:
    text: DecoderConfig = field(default_factory=DecoderConfig)
    # VisionConfig: SigLIP-style ViT (SmolVLM's); CNNConfig: MobileNet-style CNN; None: text-only model
    vision: VisionConfig | CNNConfig | None = field(default_factory=VisionConfig)
    scale_factor: int = 4  # pixel-shuffle factor of the connector
    image_token_id: int = 49190
    connector: str = "pixel-shuffle"  # or "mlp", "ldp", "cross-attention" (models/connector.py)
    cross_attention_every: int = 2  # cross-attention: a gated cross-attention block before every k-th block
    contrastive: bool = False  # a SigLIP-style image-text head (models/contrastive.py)
    # a learned table of each image token's place on its tile, added to the connector's output (pixel-shuffle)
    image_positions: bool = False

    @property
    def tokens_per_tile(self) -> int:
        """The connector's tokens per image tile (for cross-attention: the memory length per tile)."""
        assert self.vision is not None
        return tokens_per_tile(self.connector, self.vision.patches_per_side, self.scale_factor)

    @property
    def image_seq_len(self) -> int:
        """Prompt tokens per image tile: the connector's tokens, or one `<image>` marker with cross-attention."""
        return 1 if self.connector == "cross-attention" else self.tokens_per_tile

    @property
    def smolvlm_layout(self) -> bool:
        """True when transformers' SmolVLM loads this model (no architecture option beyond SmolVLM's)."""
        return (isinstance(self.vision, VisionConfig) and self.connector == "pixel-shuffle"
                and self.text.layer_repeats == 1 and not self.contrastive and not self.image_positions)

    def check(self) -> None:
        if self.text.layer_repeats < 1:
            raise SmolVLMError(f"layer_repeats (share-layers) must be >= 1, got {self.text.layer_repeats}")
        if self.vision is None:
            return
        if self.connector not in CONNECTORS:
            raise SmolVLMError(f"unknown connector {self.connector!r}; choose one of {', '.join(CONNECTORS)}")
        side = self.vision.patches_per_side
        if self.connector in ("pixel-shuffle", "cross-attention") and (side < 1 or side % self.scale_factor):
            raise SmolVLMError(f"the {self.connector} connector needs the {side}x{side} patch grid divisible by "
                               f"scale_factor {self.scale_factor}; change scale_factor or the image/patch size")
        if self.connector == "cross-attention" and self.cross_attention_every < 1:
            raise SmolVLMError(f"cross_attention_every must be >= 1, got {self.cross_attention_every}")
        if self.image_positions and self.connector != "pixel-shuffle":
            raise SmolVLMError(f"image_positions needs the pixel-shuffle connector, not {self.connector!r}")


# tiles per vision-tower call at inference: bounds the activations (the matmul attention's scores: 24 MB a tile)
VISION_BATCH = 2

# SmolVLM-256M: SigLIP-B/16 at 512 px + SmolLM2-135M; SmolVLM-500M: same encoder + SmolLM2-360M.
PRESETS: dict[str, VLMConfig] = {
    "smolvlm-256m": VLMConfig(),
    "smolvlm-500m": VLMConfig(
        text=DecoderConfig(hidden_size=960, intermediate_size=2560, num_layers=32, num_heads=15, num_kv_heads=5)
    ),
    # for tests: the real 49280-token vocabulary, everything else tiny
    "tiny": VLMConfig(
        text=DecoderConfig(
            hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
            rope_theta=10000.0, max_position_embeddings=2048,
        ),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=32,
                            patch_size=8),
        scale_factor=2,
    ),
}


def preset(name: str) -> VLMConfig:
    if name not in PRESETS:
        raise SmolVLMError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    return replace(cfg, text=replace(cfg.text), vision=replace(cfg.vision) if cfg.vision else None)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        if cfg.vision is not None:
            cnn = isinstance(cfg.vision, CNNConfig)
            self.vision_model = CNNEncoder(cfg.vision) if cnn else VisionEncoder(cfg.vision)
            side = cfg.vision.patches_per_side // cfg.scale_factor if cfg.image_positions else 0
            self.connector = make_connector(cfg.connector, cfg.vision.hidden_size, cfg.text.hidden_size,
                                            cfg.scale_factor, side)
            if cfg.contrastive:
                self.contrastive = ContrastiveHead(cfg.text.hidden_size)
        self.text_model = Decoder(cfg.text, cfg.cross_attention_every if self.cross_attention else 0,
                                  GatedCrossAttentionBlock)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.text_model.embed_tokens.weight

    @property
    def has_vision(self) -> bool:
        return self.cfg.vision is not None

    @property
    def cross_attention(self) -> bool:
        return self.has_vision and self.cfg.connector == "cross-attention"

    @property
    def has_contrastive(self) -> bool:
        return self.has_vision and self.cfg.contrastive

    @property
    def dtype(self) -> torch.dtype:
        # the embedding table stays floating point when the linear layers are quantized
        return self.text_model.embed_tokens.weight.dtype

    def encode_images(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """pixel_values (B, I, 3, H, W) as the processor pads them; pixel_attention_mask (B, I, H, W).
        Returns the projected tokens of the real images, in order: (N, image_seq_len, Dt)."""
        if not self.has_vision:
            raise SmolVLMError("this model has no vision encoder (a text-only checkpoint); drop the images")
        b, i = pixel_values.shape[:2]
        pixels = pixel_values.reshape(b * i, *pixel_values.shape[2:])  # (N, 3, H, W), still the caller's dtype
        # the processor pads a batch's image lists with all-zero images; skip them (as SmolVLM does)
        real = (pixels != 0).flatten(1).any(dim=1)
        real[0] |= ~real.any()
        if not bool(real.all()):
            pixels = pixels[real]
        ps = self.cfg.vision.patch_size
        grid = (pixels.shape[2] // ps, pixels.shape[3] // ps)  # patch rows, cols
        if pixel_attention_mask is None:
            patch_mask = None
        else:
            mask = pixel_attention_mask.reshape(b * i, *pixel_attention_mask.shape[2:])[real]  # (N, H, W)
            n, h, w = mask.shape
            h, w = h // ps * ps, w // ps * ps
            mask = mask[:, :h, :w]
            # a patch is real if any of its pixels is
            patch_mask = mask.reshape(n, h // ps, ps, w // ps, ps).any(dim=4).any(dim=2)  # (N, h, w)
        if torch.is_grad_enabled() or pixels.shape[0] <= VISION_BATCH:
            return self.connector(self.vision_model(pixels.to(self.dtype), patch_mask), grid)
        # inference: tiles go through the tower VISION_BATCH at a time (each cast to the model's dtype on the
        # way), which bounds the activations at no cost in speed (matmuls of 1024+ rows)
        out = []
        for i in range(0, pixels.shape[0], VISION_BATCH):
            chunk_mask = None if patch_mask is None else patch_mask[i : i + VISION_BATCH]
            chunk = pixels[i : i + VISION_BATCH].to(self.dtype)
            out.append(self.connector(self.vision_model(chunk, chunk_mask), grid))
        return torch.cat(out)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) with the image tokens (N, L, D) written over the `<image>` positions
        (cross-attention: the `<image>` markers keep their own embedding, one per tile)."""
        x = self.text_model.embed_tokens(input_ids)
        slots = input_ids == self.cfg.image_token_id
        n_slots = int(slots.sum())
        if image_embeds is None:
            if n_slots:
                raise SmolVLMError(f"the prompt has {n_slots} <image> tokens but no image was given")
            return x
        per_tile = 1 if self.cross_attention else image_embeds.shape[1]
        if n_slots != image_embeds.shape[0] * per_tile:
            raise SmolVLMError(
                f"the prompt has {n_slots} <image> tokens but the images give {image_embeds.shape[0] * per_tile} "
                f"({image_embeds.shape[0]} tiles); build prompts with the processor"
            )
        if self.cross_attention:
            return x
        return x.masked_scatter(slots[..., None], image_embeds.to(x.dtype))

    def group_tiles(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tiles (N, L, D), in batch order, grouped by the prompt whose `<image>` tokens they fill:
        (B, C*L, D) and a mask (B, C*L), C the most tiles of any prompt."""
        counts = (input_ids == self.cfg.image_token_id).sum(dim=1) // self.cfg.image_seq_len  # (B,) tiles
        b, (n, length, d) = input_ids.shape[0], image_embeds.shape
        if int(counts.sum()) != n:
            raise SmolVLMError(f"the prompts hold {int(counts.sum())} image tiles but {n} were given; "
                               "build prompts with the processor")
        c = max(1, int(counts.max()))
        tile_mask = torch.arange(c, device=counts.device)[None, :] < counts[:, None]  # (B, C)
        grouped = image_embeds.new_zeros(b, c, length, d)
        grouped[tile_mask] = image_embeds  # row-major: prompt 0's tiles, then prompt 1's, ...
        mask = tile_mask[:, :, None].expand(b, c, length).reshape(b, c * length)
        return grouped.reshape(b, c * length, d), mask

    def image_embedding(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """The contrastive embedding (B, D) of each prompt's images (their tiles' connector tokens)."""
        return self.contrastive.embed_images(*self.group_tiles(input_ids, image_embeds))

    def text_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The contrastive embedding (B, D) of each text (e.g. a caption, padded on the right), read from the
        decoder's final states without any image."""
        return self.contrastive.embed_texts(self.hidden_states(input_ids, attention_mask=attention_mask),
                                            attention_mask)

    def hidden_states(
        self,
        input_ids: torch.Tensor,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (B, I, 3, H, W)
        pixel_attention_mask: torch.Tensor | None = None,  # (B, I, H, W)
        image_embeds: torch.Tensor | None = None,  # (N, L, D), instead of pixel_values (reuse across turns)
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, over cache + new tokens
        position_ids: torch.Tensor | None = None,  # (B, T)
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,  # (B, 1, T, T) bool, keys per query (training's packed turns)
        real_tokens: torch.Tensor | None = None,  # (B, T) bool: training's right padding is False
    ) -> torch.Tensor:
        """The decoder's final (normed) hidden states (B, T, D); training picks the positions it needs
        before the (large) vocabulary projection. attn_mask replaces causal attention (with position_ids
        given): see data/conversations.py, independent turns. real_tokens: the decoder's position-wise parts
        skip the padding (decoder.RealTokens; zeros there in the result), without cache or cross-attention."""
        if pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, pixel_attention_mask)
        x = self.embed(input_ids, image_embeds)
        memory = memory_mask = None
        if self.cross_attention and image_embeds is not None:
            memory, memory_mask = self.group_tiles(input_ids, image_embeds.to(x.dtype))
        t = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                # left padding: positions count real tokens only (as HF generate does)
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=input_ids.device)[None].expand(x.shape[0], t)
        key_mask = attention_mask.bool() if attention_mask is not None else None
        real = None
        if real_tokens is not None and cache is None and memory is None and not bool(real_tokens.all()):
            real = RealTokens.of(real_tokens)
        return self.text_model(x, position_ids, key_mask, cache, memory, memory_mask, attn_mask, real=real)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,  # logits of the last position only (generation)
    ) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with last_only."""
        h = self.hidden_states(input_ids, pixel_values, pixel_attention_mask, image_embeds, attention_mask,
                               position_ids, cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)
