"""The MobileNet-style CNN vision encoder: token grid shapes, positions, save / reload, generation."""

import json

import pytest
import torch

from smolvlm.io import load, save
from smolvlm.models.cnn import CNNConfig, CNNEncoder, init_cnn
from smolvlm.train import build_train_model, resolve_config


@pytest.mark.parametrize("h,w", [(64, 64), (32, 96), (96, 40)])
def test_cnn_gives_one_token_per_stride_cell_for_non_square_images(h, w):
    cfg = CNNConfig(hidden_size=24, stem_width=8, widths=(16, 24), blocks_per_stage=2, image_size=64)
    assert cfg.patch_size == 8
    enc = CNNEncoder(cfg).eval()
    init_cnn(enc)
    out = enc(torch.rand(2, 3, h, w))
    assert out.shape == (2, (h // 8) * (w // 8), 24)
    with pytest.raises(ValueError, match="divisible by 8"):
        enc(torch.rand(1, 3, 60, 64))


def test_cnn_tokens_know_where_they_are():
    """Two copies of the same patch content at different grid cells give different tokens (learned
    positions), so left/right is visible to the decoder."""
    enc = CNNEncoder(CNNConfig(hidden_size=16, stem_width=8, widths=(8, 16), image_size=32)).eval()
    init_cnn(enc)
    out = enc(torch.zeros(1, 3, 32, 32))  # every cell sees the same (empty) input
    assert not torch.allclose(out[0, 0], out[0, 5])


def test_initial_positions_are_as_loud_as_features_and_order_columns():
    """init_cnn starts the position table at 2D sine-cosine codes of unit mean square (not normal(0.02),
    which LayerNorm leaves inaudible next to the features), one code per column shared down the column,
    and a linear read-out recovers the column index (what "left of" needs)."""
    side, dim = 8, 64
    enc = CNNEncoder(CNNConfig(hidden_size=dim, stem_width=8, widths=(8, 16), image_size=side * 8))
    init_cnn(enc)
    pos = enc.position_embedding.weight.detach()  # (side*side, dim), row-major grid
    assert abs(pos.pow(2).mean().item() - 1.0) < 1e-4
    grid = pos.view(side, side, dim)
    column_part = grid[..., : dim // 2]
    assert torch.allclose(column_part, column_part[:1].expand_as(column_part))  # same code down a column
    assert len({tuple(r.tolist()) for r in pos}) == side * side  # every cell its own code
    cols = torch.arange(side, dtype=torch.float32).repeat(side)  # column index of each row-major cell
    design = torch.cat([pos, torch.ones(side * side, 1)], dim=1).double()  # rank-deficient: solve by SVD
    fit = torch.linalg.pinv(design) @ cols[:, None].double()
    assert (design @ fit - cols[:, None]).abs().max() < 0.05


def test_cnn_model_saves_reloads_and_says_what_it_is(tmp_path):
    cfg = resolve_config("test-tiny", None, ["model.vision_type=cnn", "model.cnn.image_size=32",
                                             "model.cnn.widths=[16,24]", "model.cnn.hidden_size=32"])
    model, processor = build_train_model(cfg.model, 0)
    model.eval()
    save(model, processor, tmp_path / "m")
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf["model_type"] == "smolvlm_variant"  # so transformers refuses it instead of loading it wrongly
    assert hf["vision_config"]["model_type"] == "smolvlm_cnn"
    again, proc2 = load(tmp_path / "m", "float32")
    assert isinstance(again.cfg.vision, CNNConfig) and again.cfg.vision.widths == (16, 24)
    pixels = torch.rand(1, 1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_images(pixels), again.encode_images(pixels))
        bf16, _ = load(tmp_path / "m", "bfloat16")
        diff = (bf16.encode_images(pixels).float() - model.encode_images(pixels)).abs().max()
    assert diff < 0.1
    assert proc2.image_seq_len == model.cfg.image_seq_len == 4


def test_unknown_vision_type_is_a_clear_error():
    from smolvlm.errors import SmolVLMError

    with pytest.raises(SmolVLMError, match="vision_type must be 'vit' or 'cnn'"):
        resolve_config("test-tiny", None, ["model.vision_type=resnet"])
