"""The embedded default data set (rendered, captioned scenes) and the end-to-end smoke demo.

The scenes are drawn here, so the demo needs no download and no shared data: one shape per image, with a
colour, a size and a position, and a caption that says all three.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right")


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on the {self.position}"


def render(scene: Scene, image_size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw ``scene`` on a light grey background, with a little random jitter in place and size."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (image_size, image_size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    radius = image_size * (0.12 if scene.size == "small" else 0.24) * rng.uniform(0.9, 1.1)
    cx = image_size * (0.28 if scene.position == "left" else 0.72) + rng.uniform(-2, 2)
    cy = image_size * 0.5 + rng.uniform(-image_size * 0.15, image_size * 0.15)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return img


def all_scenes() -> list[Scene]:
    return [Scene(c, s, z, p) for c in COLORS for s in SHAPES for z in SIZES for p in POSITIONS]


def make_scenes(count: int, seed: int = 0, image_size: int = 64) -> tuple[list[Image.Image], list[str]]:
    """``count`` rendered scenes cycling through every attribute combination, and their captions."""
    rng = random.Random(seed)
    scenes = all_scenes()
    chosen = [scenes[i % len(scenes)] for i in range(count)]
    return [render(s, image_size, rng) for s in chosen], [s.caption for s in chosen]


def smoke(out_dir: str | Path = "runs/demo", steps: int = 60, seed: int = 0) -> dict[str, float]:
    """Train the ``tiny`` preset for a few steps on rendered scenes, save, reload, and report.

    Returns the first and last training loss, image->text recall@1 on the training scenes (against a
    chance level of 1 / number of scenes) and whether the reloaded model embeds bit-identically.
    """
    import torch

    from clipcraft.losses import clip_loss
    from clipcraft.model import create_model, load

    torch.manual_seed(seed)
    model = create_model("tiny")
    images, captions = make_scenes(len(all_scenes()), seed=seed)
    transform = model.image_transform(train=False)
    pixels = torch.stack([transform(im) for im in images])  # (N, 3, H, W)
    tokens = model.tokenize(captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        out = model(pixels, tokens)
        loss = clip_loss(out.image_embeddings, out.text_embeddings, out.logit_scale)  # type: ignore[arg-type]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    image_emb = model.encode_images(images)
    text_emb = model.encode_texts(captions)
    recall1 = float(np.mean((image_emb @ text_emb.T).argmax(1) == np.arange(len(captions))))
    saved = model.save(Path(out_dir) / "model")
    reloaded = load(saved)
    identical = bool(np.array_equal(reloaded.encode_texts(captions), text_emb))
    return {
        "steps": steps,
        "train_seconds": seconds,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "i2t_r1": recall1,
        "chance_r1": 1.0 / len(captions),
        "reload_identical": identical,
        "model_dir": str(saved),
    }
