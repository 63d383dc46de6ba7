"""What a stage trains (smolvlm.train.setup): a LoRA stage on a finished model learns, and its adapters reload
onto the base model to give the merged model's outputs."""

import json

import torch

from smolvlm.io import load
from smolvlm.train import StepBatches, build_data, resolve_config, token_losses, train


def cross_entropy_on(model, steps, cfg, n_steps: int = 10) -> float:
    """Cross-entropy per answer token of `model` on the first n_steps batches of `steps` (a StepBatches)."""
    total = tokens = 0
    with torch.no_grad():
        for s in range(n_steps):
            for batch in steps[s]:
                embeds = model.encode_images(batch["pixel_values"], batch.get("pixel_attention_mask"))
                _, ce, n = token_losses(model, batch, None, cfg.distill, False, embeds)
                total, tokens = total + float(ce), tokens + n
    return total / tokens


def test_lora_stage_learns_and_adapters_reload(tmp_path, base_run):
    from smolvlm.lora import load_adapters

    out = tmp_path / "lora"
    cfg = resolve_config("test-tiny", None, [
        f"model.init={base_run / 'model'}", "bf16=false", "threads=1", "stages.0.steps=10",
        "stages.0.train=[lora]", "optim.lr_lora=0.01", "lora.rank=4", "data.seed=1",
    ])
    train(cfg, out, progress=False)
    assert json.loads((out / "adapters" / "adapter_config.json").read_text())["r"] == 4
    merged, processor = load(out / "model")
    base, _ = load(base_run / "model")
    # the adapters lower the loss on the batches they were trained on (measured on those fixed batches: the
    # running loss's batch-to-batch spread is larger than what 10 adapter steps on a 12-step base can learn)
    steps = StepBatches(build_data(cfg.data, cfg.seed, cfg.batch_size), processor, cfg, 0, 1)
    assert cross_entropy_on(merged, steps, cfg) < cross_entropy_on(base, steps, cfg) - 1e-3
    with_adapters = load_adapters(base, out / "adapters").eval()
    ids = processor("<|im_start|>User: How many objects are there?<end_of_utterance>\nAssistant:")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(with_adapters(ids), merged(ids), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(load(base_run / "model")[0](ids), merged(ids), atol=1e-4)
