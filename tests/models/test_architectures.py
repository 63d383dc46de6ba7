"""The architecture options: connector shapes, cross-attention (closed gates at init, KV cache, batching),
shared layers (one copy of the weights, applied K times), the contrastive head, and every variant trained,
saved, reloaded and asked from the command line."""

import json
import math
from dataclasses import replace

import pytest
import torch

from smolvlm.cli.main import main
from smolvlm.cli.train import CONNECTORS as CLI_CONNECTORS
from smolvlm.errors import SmolVLMError
from smolvlm.generation import SamplingParams, generate, generate_batch
from smolvlm.io import load
from smolvlm.models.connector import CONNECTORS, LDPConnector, MLPConnector, pixel_shuffle
from smolvlm.models.contrastive import ContrastiveHead, sigmoid_loss
from smolvlm.models.cross_attention import CrossAttention
from smolvlm.models.decoder import KVCache
from smolvlm.models.vlm import VLM, VLMConfig, preset
from smolvlm.train import build_train_model, init_weights, resolve_config


def tiny(**options) -> VLMConfig:
    return replace(preset("tiny"), **options)


def image_prompt(cfg: VLMConfig, text_ids: list[int], tiles: int = 1) -> torch.Tensor:
    return torch.tensor([[cfg.image_token_id] * (cfg.image_seq_len * tiles) + text_ids])


# ----------------------------------------------------------------------------------------- connectors


@pytest.mark.parametrize("h,w", [(4, 4), (4, 6), (5, 3), (1, 7)])
def test_ldp_halves_each_side_of_non_square_grids(h, w):
    ldp = LDPConnector(24, 16).eval()
    out = ldp(torch.randn(2, h * w, 24), (h, w))
    assert out.shape == (2, math.ceil(h / 2) * math.ceil(w / 2), 16)
    assert MLPConnector(24, 16)(torch.randn(2, h * w, 24), (h, w)).shape == (2, h * w, 16)
    with pytest.raises(SmolVLMError, match="12 patches for a 4x4 grid"):
        ldp(torch.randn(1, 12, 24), (4, 4))


@pytest.mark.parametrize("vision_type", ["vit", "cnn"])
def test_ldp_model_encodes_non_square_images(vision_type):
    overrides = ["model.connector=ldp", f"model.vision_type={vision_type}", "model.cnn.image_size=32"]
    model, _ = build_train_model(resolve_config("test-tiny", None, overrides).model, 0)
    with torch.no_grad():
        out = model.encode_images(torch.rand(1, 1, 3, 32, 48))  # 4x6 patches -> 2x3 tokens
    assert out.shape == (1, 6, model.cfg.text.hidden_size)
    assert model.cfg.image_seq_len == 4  # a square 32-px tile: 4x4 patches -> 2x2


def test_pixel_shuffle_grid_errors_are_clear():
    with pytest.raises(SmolVLMError, match="square patch grid with sides divisible by scale_factor 2"):
        pixel_shuffle(torch.randn(1, 24, 8), 2)
    with pytest.raises(SmolVLMError, match="4x4 patch grid divisible by scale_factor 3"):
        VLM(tiny(scale_factor=3))
    with pytest.raises(SmolVLMError, match="unknown connector 'foo'"):
        VLM(tiny(connector="foo"))


# ------------------------------------------------------------------------------------- cross-attention


def opened(model: VLM, value: float = 0.5) -> VLM:
    with torch.no_grad():
        for block in model.text_model.cross_layers:
            block.attn_gate.fill_(value)
            block.mlp_gate.fill_(value)
    return model


def test_image_positions_tell_identical_tokens_apart_and_fit_the_tile():
    model = VLM(tiny(image_positions=True)).eval()
    table = model.connector.position_embedding  # (tokens per tile, Dt), sin-cos at the start
    assert table.shape == (model.cfg.tokens_per_tile, model.cfg.text.hidden_size)
    assert table.pow(2).mean().sqrt().item() == pytest.approx(0.5, rel=1e-3)
    hidden = torch.ones(1, 16, model.cfg.vision.hidden_size)  # every patch the same
    with torch.no_grad():
        tokens = model.connector(hidden, (4, 4))[0]
    assert len({tuple(t.tolist()) for t in tokens}) == tokens.shape[0]  # ...but every token differs
    assert not model.cfg.smolvlm_layout and "connector.position_embedding" in model.state_dict()
    with pytest.raises(SmolVLMError, match="image positions cover 4 tokens per tile, the image gives 16"):
        model.connector(torch.ones(1, 64, model.cfg.vision.hidden_size), (8, 8))
    with pytest.raises(SmolVLMError, match="image_positions needs the pixel-shuffle connector, not 'mlp'"):
        VLM(tiny(image_positions=True, connector="mlp"))


def test_cross_attention_gates_start_closed():
    """At init the cross-attention model gives exactly the logits of its decoder without the cross layers."""
    torch.manual_seed(0)
    model = VLM(tiny(connector="cross-attention", cross_attention_every=1))
    init_weights(model)
    model.eval()
    assert len(model.text_model.cross_layers) == model.cfg.text.num_layers
    text_only = VLM(replace(model.cfg, vision=None))
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("text_model.", "lm_head."))
             and not k.startswith("text_model.cross_layers.")}
    text_only.load_state_dict(state)
    ids = image_prompt(model.cfg, [5, 6, 7, 8], tiles=2)
    pixels = torch.rand(1, 2, 3, 32, 32)
    text_only.eval()
    with torch.no_grad():
        # the decoder alone, on the same token ids (a text-only VLM would refuse the <image> markers)
        positions = torch.arange(ids.shape[1])[None]
        reference = text_only.lm_head(text_only.text_model(text_only.text_model.embed_tokens(ids), positions))
        assert torch.equal(model(ids, pixels), reference)
        # open gates: now the image matters
        opened(model)
        a, b = model(ids, pixels), model(ids, torch.rand(1, 2, 3, 32, 32))
    assert not torch.allclose(a, b)
    assert model.cfg.image_seq_len == 1 and model.cfg.tokens_per_tile == 4  # one marker per tile in the prompt


def test_cross_attention_image_count_mismatch_is_clear():
    model = VLM(tiny(connector="cross-attention")).eval()
    with torch.no_grad(), pytest.raises(SmolVLMError, match="the prompt has 2 <image> tokens but the images give 1"):
        model(image_prompt(model.cfg, [5], tiles=2), torch.rand(1, 1, 3, 32, 32))


@pytest.fixture(scope="module")
def xattn_model():
    cfg = resolve_config("test-tiny", None, ["model.connector=cross-attention", "model.cross_attention_every=1"])
    model, processor = build_train_model(cfg.model, 0)
    return opened(model.eval()), processor


def shapes_prompts(processor, n: int):
    from smolvlm.data.shapes import ShapesWorld
    from smolvlm.eval.predict import _messages

    items = list(ShapesWorld(seed=0).captioning("test", n))
    questions = ["What is this?", "How many objects are there in the picture?", "Describe it."][:n]
    texts = [processor.apply_chat_template(_messages(1, q), add_generation_prompt=True) for q in questions]
    return texts, [[it.image] for it in items]


def test_cross_attention_generation_cache_and_left_padded_batch(xattn_model, monkeypatch):
    model, processor = xattn_model
    texts, images = shapes_prompts(processor, 3)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    calls = []
    memory_kv = CrossAttention.memory_kv
    monkeypatch.setattr(CrossAttention, "memory_kv", lambda self, m: calls.append(m.shape) or memory_kv(self, m))
    alone = [generate(model, processor, processor(t, images=[im]), params).token_ids
             for t, im in zip(texts, images, strict=True)]
    # the visual memory goes through each cross layer once per request (prefill), not once per token
    assert len(calls) == 3 * len(model.text_model.cross_layers)
    no_cache = replace(params, use_cache=False)
    assert generate(model, processor, processor(texts[1], images=[images[1]]), no_cache).token_ids == alone[1]
    batch = processor(texts, images=images)  # left-padded: the prompts differ in length
    assert (batch["attention_mask"] == 0).any()
    assert [r.token_ids for r in generate_batch(model, processor, batch, params)] == alone


# ------------------------------------------------------------------------------------------ shared layers


def test_shared_layers_share_storage_and_equal_an_unrolled_decoder():
    torch.manual_seed(0)
    shared_cfg = tiny(text=replace(preset("tiny").text, layer_repeats=3))
    shared = VLM(shared_cfg).eval()
    plain = VLM(tiny()).eval()
    # depth without parameters: the same count as one pass through the blocks, one copy in the state dict
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in plain.parameters())
    assert shared.state_dict().keys() == plain.state_dict().keys()
    assert KVCache(shared_cfg.text, 1, 8, torch.float32).k.shape[0] == 3 * shared_cfg.text.num_layers
    # every application of a block uses the same weight storage
    seen = []
    hook = shared.text_model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda mod, inp, out: seen.append(mod.weight.data_ptr()))
    ids = image_prompt(shared_cfg, [3, 4, 5])
    pixels = torch.rand(1, 1, 3, 32, 32)
    with torch.no_grad():
        logits = shared(ids, pixels)
    hook.remove()
    assert len(seen) == 3 and len(set(seen)) == 1
    # the same as a 3x deeper decoder whose blocks are copies: block i at depths 3i, 3i+1, 3i+2
    deep_text = replace(shared_cfg.text, num_layers=3 * shared_cfg.text.num_layers, layer_repeats=1)
    deep = VLM(replace(shared_cfg, text=deep_text)).eval()
    state = {}
    for k, v in shared.state_dict().items():
        if k.startswith("text_model.layers."):
            i, rest = k.removeprefix("text_model.layers.").split(".", 1)
            for r in range(3):
                state[f"text_model.layers.{3 * int(i) + r}.{rest}"] = v
        else:
            state[k] = v
    deep.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(deep(ids, pixels), logits)
        # and the KV cache path (one slot per application) gives the same tokens as recomputing
        cached = shared(ids, pixels, cache=KVCache(shared_cfg.text, 1, 16, torch.float32), last_only=True)
    torch.testing.assert_close(cached[:, -1], logits[:, -1])


# --------------------------------------------------------------------------------------------- contrastive


def test_contrastive_head_starts_as_siglip_and_its_loss_is_the_sigmoid_loss():
    head = ContrastiveHead(8)
    assert head.logit_scale.item() == pytest.approx(math.log(10)) and head.logit_bias.item() == -10
    z = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    logits = head.logits(z, z)
    expected = -sum(torch.nn.functional.logsigmoid((1.0 if i == j else -1.0) * logits[i, j])
                    for i in range(3) for j in range(3)) / 3
    torch.testing.assert_close(sigmoid_loss(logits), expected)
    tokens, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    emb = head.embed_images(tokens, mask)
    assert emb.shape == (2, 8) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(emb[0], head.embed_images(tokens[:1, :3], mask[:1, :3])[0])  # padding ignored


# ------------------------------------------------------------------------------- every variant, end to end

VARIANT_FLAGS = {
    "baseline": [],
    "cnn": ["--vision", "cnn", "model.cnn.image_size=32"],
    "mlp": ["--connector", "mlp"],
    "ldp": ["--connector", "ldp"],
    "cross-attention": ["--connector", "cross-attention", "--cross-attention-every", "1"],
    "share-layers": ["--share-layers", "2"],
    "contrastive": ["--contrastive-weight", "0.1"],
    "image-positions": ["model.image_positions=true"],
}


@pytest.mark.usefixtures("restore_torch_threads")
@pytest.mark.parametrize("variant", list(VARIANT_FLAGS))
def test_each_variant_trains_saves_reloads_and_answers_from_the_cli(variant, tmp_path, capsys):
    from smolvlm.data.shapes import ShapesWorld

    out = tmp_path / "run"
    assert main(["train", "--preset", "test-tiny", "--out", str(out), "--max-steps", "2", "--no-progress",
                     "--json", *VARIANT_FLAGS[variant], "stages.0.steps=2", "threads=1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["model"] == str(out / "model")
    hf = json.loads((out / "model" / "config.json").read_text())
    assert hf["model_type"] == ("smolvlm" if variant == "baseline" else "smolvlm_variant")
    model, processor = load(out / "model")
    expect = {"mlp": ("connector", "mlp"), "ldp": ("connector", "ldp"),
              "cross-attention": ("connector", "cross-attention"), "contrastive": ("contrastive", True),
              "image-positions": ("image_positions", True)}
    if variant in expect:
        key, value = expect[variant]
        assert hf[key] == value and getattr(model.cfg, key) == value
    assert (hf["text_config"].get("layer_repeats", 1), model.cfg.text.layer_repeats) == ((2, 2) if variant ==
                                                                                        "share-layers" else (1, 1))
    assert processor.image_seq_len == model.cfg.image_seq_len
    image = tmp_path / "scene.png"
    next(iter(ShapesWorld(seed=0).captioning("test", 1))).image.save(image)
    assert main(["generate", "--model", str(out / "model"), "--image", str(image), "--prompt", "What is it?",
                     "--max-new-tokens", "3", "--ignore-eos", "--json", "--threads", "1"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["completion_tokens"] == 3


def test_option_errors_are_one_clear_line(tmp_path, capsys):
    def error(*argv) -> str:
        assert main(["train", "--preset", "test-tiny", "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return err

    assert "unknown connector 'foo' (model.connector / --connector); choose one of pixel-shuffle" in error(
        "--connector", "foo")
    assert "model.vision_type must be 'vit' or 'cnn', got 'resnet'" in error("--vision", "resnet")
    assert "--share-layers" in error("--share-layers", "0")
    assert "keeps that checkpoint's architecture; drop model.connector" in error(
        "model.init=some/ckpt", "--connector", "mlp")
    assert "a blind (text-only) model takes no vision options" in error("model.blind=true", "stages.0.train=[decoder]",
                                                                          "--share-layers", "2")
    assert "only data.source=shapes provides" in error("--contrastive-weight", "0.1", "data.source=llava",
                                                       "data.path=x.json")
    assert "objective must be 'lm' or 'contrastive'" in error("stages.0.objective=clip")


def test_cli_knows_the_connectors_without_importing_torch():
    assert CLI_CONNECTORS == CONNECTORS


@pytest.mark.usefixtures("restore_torch_threads")
def test_contrastive_alignment_stage(tmp_path):
    from smolvlm.train import read_metrics, train

    cfg = resolve_config("test-tiny", None, ["stages.0.objective=contrastive", "stages.0.train=[vision,connector]",
                                             "stages.0.steps=4", "threads=1", "bf16=false"])
    result = train(cfg, tmp_path / "align", progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "align")]
    # SigLIP's start: b = -10 makes each of the B positives cost about 10 and the negatives about 0
    assert losses[0] == pytest.approx(10.0, abs=0.5) and losses[-1] < losses[0]
    model, _ = load(result.model_dir)
    assert model.has_contrastive and model.contrastive.logit_bias.item() != -10.0
