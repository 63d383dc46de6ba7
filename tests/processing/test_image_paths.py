"""One road for an image: whichever command reads it (generate, chat, serve, caption, eval), the pixel values
that reach the model equal the reference road's, `processing.open_image` (EXIF orientation applied) and then the
processor (transparency composited over white). Three images that tell the roads apart are made here: a JPEG
whose EXIF orientation turns it upright, an RGBA PNG with fully and half transparent areas, and a palette PNG
with a tRNS transparent index whose colour is black. The pixels are captured where they enter the model
(`VLM.encode_images`), with each command run in-process through `smolvlm.cli.main`."""

import base64
import io
import json
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from smolvlm.cli.main import main
from smolvlm.io import load
from smolvlm.models.vlm import VLM
from smolvlm.processing import open_image

pytestmark = pytest.mark.usefixtures("restore_torch_threads")
RUN = ["--dtype", "float32", "--threads", "1"]
NAMES = ("rotated.jpg", "alpha.png", "palette.png")


@dataclass
class Tile:
    pixels: torch.Tensor  # (3, H, W) float32, normalized
    mask: torch.Tensor | None  # (H, W) bool, None when the processor does not pad
    label: str = ""  # which image and tile, for the reference road's tiles


def real_tiles(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None) -> list[Tile]:
    """The tiles of (B, I, 3, H, W) pixel values that are images: the processor pads a batch's image lists with
    all-zero tiles, which the model skips (a normalized real tile is never all zero)."""
    tiles = pixel_values.reshape(-1, *pixel_values.shape[2:])
    masks = None if pixel_attention_mask is None else pixel_attention_mask.reshape(-1, *pixel_attention_mask.shape[2:])
    return [Tile(tiles[j].clone(), None if masks is None else masks[j].clone())
            for j in range(tiles.shape[0]) if bool((tiles[j] != 0).any())]


@pytest.fixture
def seen(monkeypatch) -> list[Tile]:
    """Every real tile given to the model's vision entry, in order. Class-level, so it sees the serve engine's
    worker threads and the models each command loads. Generation's embedding cache passes on only the tiles it
    has not seen yet, so the images here are noise: no two tiles alike, every one reaches the model."""
    tiles: list[Tile] = []
    encode = VLM.encode_images

    def recording(self, pixel_values, pixel_attention_mask=None):
        tiles.extend(real_tiles(pixel_values, pixel_attention_mask))
        return encode(self, pixel_values, pixel_attention_mask)

    monkeypatch.setattr(VLM, "encode_images", recording)
    return tiles


def noise(size: tuple[int, int], seed: int) -> np.ndarray:
    w, h = size
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The three images, by name. Sizes are not square and differ, so a lost rotation changes the tile grid."""
    folder = tmp_path_factory.mktemp("image-roads")
    # stored 48x24, EXIF orientation 6 ("rotate 90 clockwise to view"): upright it is 24x48
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(noise((48, 24), 0)).save(folder / NAMES[0], quality=95, exif=exif.tobytes())

    # RGBA 60x30: 6x6 blocks alternate fully transparent / opaque, the right third is half transparent; the
    # colour under alpha 0 is black, so dropping alpha and compositing over black agree and both differ from white
    rgba = np.concatenate([noise((60, 30), 1), np.full((30, 60, 1), 255, np.uint8)], axis=2)
    yy, xx = np.mgrid[0:30, 0:60]
    clear = (yy // 6 + xx // 6) % 2 == 0
    rgba[clear] = 0
    rgba[:, 40:, 3] = np.where(clear[:, 40:], 0, 128)
    Image.fromarray(rgba, "RGBA").save(folder / NAMES[1])

    # palette 36x54 with 16 colours; index 0 is black and transparent (a tRNS chunk)
    pal = Image.fromarray(np.random.default_rng(2).integers(0, 16, (54, 36), dtype=np.uint8), "P")
    colours = noise((16, 1), 3).reshape(-1)
    colours[:3] = 0
    pal.putpalette(colours.tolist())
    pal.save(folder / NAMES[2], transparency=0)
    return {name: folder / name for name in NAMES}


@pytest.fixture(scope="module")
def model_dir(tiny_hf_checkpoint):
    return tiny_hf_checkpoint[0]


@pytest.fixture(scope="module")
def processor(model_dir):
    return load(model_dir, dtype="float32")[1]


def road(processor, image: Image.Image) -> list[Tile]:
    return real_tiles(**{k: v for k, v in processor.process_images([[image]]).items() if k not in ("rows", "cols")})


def reference(processor, paths) -> list[Tile]:
    """The reference road: processing.open_image, then the processor; one image at a time, in order."""
    tiles = []
    for p in paths:
        tiles += [Tile(t.pixels, t.mask, f"{p.name}'s tile {k}") for k, t in enumerate(road(processor, open_image(p)))]
    return tiles


def assert_same_tiles(got: list[Tile], want: list[Tile], what: str) -> None:
    shapes = [tuple(t.pixels.shape) for t in got], [tuple(t.pixels.shape) for t in want]
    assert len(got) == len(want), f"{what}: {len(got)} tiles reached the model, the reference road gives " \
                                  f"{len(want)} (a lost EXIF rotation can change the tile grid)"
    for g, w in zip(got, want, strict=True):
        assert g.pixels.shape == w.pixels.shape, f"{what}: {w.label} has another shape: {shapes}"
        assert torch.equal(g.pixels, w.pixels), (
            f"{what}: {w.label} differs from the reference road's (max abs diff "
            f"{(g.pixels - w.pixels).abs().max():.3f}): lost EXIF rotation, or transparency not over white?")
        assert (g.mask is None) == (w.mask is None) and (g.mask is None or torch.equal(g.mask, w.mask)), \
            f"{what}: {w.label}'s padding mask differs"


# ------------------------------------------------------------------------------------------ the images
def test_the_images_tell_the_roads_apart(processor, images):
    """The premise: the reference road turns the JPEG upright and puts transparency on white (checked against
    both done by hand here), and for each image a loader that skips the rotation or puts transparency on black
    gives other pixels, so the tests below can see it."""
    def over(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")

    rotated, alpha, palette = (images[n] for n in NAMES)
    assert Image.open(rotated).size == (48, 24) and open_image(rotated).size == (24, 48)
    assert Image.open(palette).mode == "P" and "transparency" in Image.open(palette).info

    def differs(a: list[Tile], b: list[Tile]) -> bool:
        return len(a) != len(b) or any(not torch.equal(x.pixels, y.pixels) for x, y in zip(a, b, strict=True))

    # orientation 6 is "rotate 90 degrees clockwise to view", PIL's ROTATE_270 (counter-clockwise angles)
    upright = Image.open(rotated).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert not differs(reference(processor, [rotated]), road(processor, upright))
    for p in (alpha, palette):
        assert not differs(reference(processor, [p]), road(processor, over(Image.open(p), (255, 255, 255))))
    assert differs(road(processor, Image.open(rotated).convert("RGB")), reference(processor, [rotated]))
    assert differs(road(processor, Image.open(alpha).convert("RGB")), reference(processor, [alpha]))  # alpha dropped
    # (a palette image converted to RGB keeps its tRNS as a colour key in .info, which the processor still honours)
    for p in (alpha, palette):
        assert differs(road(processor, over(Image.open(p), (0, 0, 0))), reference(processor, [p]))


# ---------------------------------------------------------------------------------------------- paths
def test_generate(capsys, seen, model_dir, processor, images):
    paths = [images[n] for n in NAMES]
    code = main(["generate", "--model", str(model_dir), *[a for p in paths for a in ("--image", str(p))],
                 "--prompt", "What is it?", "--max-new-tokens", "1", "--json", *RUN])
    assert code == 0, capsys.readouterr().err
    assert_same_tiles(seen, reference(processor, paths), "generate")


@pytest.mark.parametrize("road", ["--image", "/image"])
def test_chat(monkeypatch, capsys, seen, model_dir, processor, images, road):
    """Both of chat's roads for an image: --image for the first question, /image for the next one."""
    paths = [images[n] for n in NAMES]
    if road == "--image":
        script, options = "What is it?\n/quit\n", [a for p in paths for a in ("--image", str(p))]
    else:
        script, options = "".join(f"/image {p}\n" for p in paths) + "What is it?\n/quit\n", []
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code = main(["chat", "--model", str(model_dir), *options, "--max-new-tokens", "1", *RUN])
    err = capsys.readouterr().err
    assert code == 0 and "error" not in err, err
    assert_same_tiles(seen, reference(processor, paths), f"chat {road}")


def test_serve_data_urls(monkeypatch, seen, model_dir, processor, images):
    """`smolvlm serve` as its entry point builds it, driven in-process: uvicorn.run gets the app, a TestClient
    posts one OpenAI chat request with the three images as base64 data: URLs."""
    import uvicorn
    from fastapi.testclient import TestClient

    mime = {".jpg": "image/jpeg", ".png": "image/png"}
    parts = [{"type": "image_url", "image_url": {"url": f"data:{mime[images[n].suffix]};base64,"
                                                        + base64.b64encode(images[n].read_bytes()).decode()}}
             for n in NAMES]
    request = {"model": "m", "max_tokens": 1,
               "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}]}
    responses = []

    def run(app, **_):
        with TestClient(app) as client:
            responses.append(client.post("/v1/chat/completions", json=request))

    monkeypatch.setattr(uvicorn, "run", run)
    assert main(["serve", "--model", str(model_dir), *RUN]) == 0
    assert responses[0].status_code == 200, responses[0].text
    assert_same_tiles(seen, reference(processor, [images[n] for n in NAMES]), "serve")


def test_caption(capsys, seen, model_dir, processor, images, tmp_path):
    """Batched (two images, then one), in the order given."""
    paths = [images[n] for n in NAMES]
    code = main(["caption", *map(str, paths), "--model", str(model_dir), "--out", str(tmp_path / "c.jsonl"),
                 "--batch-size", "2", "--max-new-tokens", "1", "--json", *RUN])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["captioned"] == 3, err
    assert_same_tiles(seen, reference(processor, paths), "caption")


@pytest.mark.parametrize("task", ["coco-captions", "flickr30k-retrieval"])
def test_eval(capsys, seen, model_dir, processor, images, tmp_path, task):
    """Two of eval's image entries: captioning (batched generation) and retrieval by caption log-probability
    (the vision tower called once per image). Both read COCO/Karpathy files that name the images."""
    if task == "coco-captions":
        data = {"images": [{"id": i, "file_name": n} for i, n in enumerate(NAMES)],
                "annotations": [{"id": i, "image_id": i, "caption": f"picture {i}"} for i in range(len(NAMES))]}
    else:
        data = {"images": [{"filename": n, "imgid": i, "split": "test", "sentences": [{"raw": f"picture {i}"}]}
                           for i, n in enumerate(NAMES)]}
    (tmp_path / "data.json").write_text(json.dumps(data))
    folder = images[NAMES[0]].parent
    code = main(["eval", "--model", str(model_dir), "--task", task, "--data", str(tmp_path / "data.json"),
                 "--images", str(folder), "--out", str(tmp_path / "run"), "--max-new-tokens", "1",
                 "--batch-size", "3", "--no-progress", "--json", *RUN])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and not any(r.get("error") for r in rows), rows
    assert_same_tiles(seen, reference(processor, [images[n] for n in NAMES]), f"eval {task}")
