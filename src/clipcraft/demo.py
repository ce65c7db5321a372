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

    @property
    def captions(self) -> list[str]:
        """Several phrasings of the same scene (the data set keeps them grouped by image)."""
        return [
            self.caption,
            f"a {self.color} {self.shape}, {self.size}, on the {self.position} side",
            f"on the {self.position} there is a {self.size} {self.shape} coloured {self.color}",
        ]


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


# (colour, shape) pairs never shown in training: zero-shot transfer to unseen combinations is measured on them.
HELD_OUT = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
    ("purple", "circle"),
    ("orange", "square"),
)


def write_scene_dataset(
    root: str | Path, train: int = 1800, val: int = 300, test: int = 300, seed: int = 0
) -> Path:
    """Write a Hugging Face style image folder of rendered scenes: ``train/``, ``validation/`` and ``test/``,
    each with PNG images and a ``metadata.jsonl`` of their captions.

    Training and validation scenes never use a :data:`HELD_OUT` (colour, shape) pair; the test split is half
    held-out pairs and half seen ones. Existing data in ``root`` is reused when it was written with the same
    arguments.
    """
    import json

    root = Path(root)
    stamp = root / "dataset.json"
    args = {"train": train, "val": val, "test": test, "seed": seed, "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == args:
        return root
    rng = random.Random(seed)
    scenes = all_scenes()
    seen = [s for s in scenes if (s.color, s.shape) not in HELD_OUT]
    unseen = [s for s in scenes if (s.color, s.shape) in HELD_OUT]
    plan = {
        "train": [rng.choice(seen) for _ in range(train)],
        "validation": [rng.choice(seen) for _ in range(val)],
        "test": [rng.choice(unseen if i % 2 == 0 else seen) for i in range(test)],
    }
    for split, split_scenes in plan.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w") as fh:
            for i, scene in enumerate(split_scenes):
                name = f"{i:05d}.png"
                render(scene, 64, rng).save(folder / name)
                row = {"file_name": name, "text": scene.captions, "color": scene.color, "shape": scene.shape}
                fh.write(json.dumps(row) + "\n")
    stamp.write_text(json.dumps(args))
    return root


DEMO_CONFIG = {
    "model": "minilm-vit-tiny",
    # a small ViT for 64 px scenes, trained from scratch; the real MiniLM text tower stays locked (LiT), so its
    # features are computed once and cached
    "model_overrides": {
        "image.model_kwargs": {
            "img_size": 64,
            "patch_size": 16,
            "depth": 4,
            "embed_dim": 192,
            "num_heads": 3,
            "global_pool": "avg",
        },
        "embed_dim": 128,
    },
    "lock_text": True,
    "epochs": 15,
    "batch_size": 64,
    "lr_image_tower": 1e-3,
    "lr_heads": 1e-3,
    "weight_decay": 0.05,
    "warmup_steps": 20,
    "num_workers": 2,
    "eval_batch_size": 128,
    "augment": False,
    "log_every": 5,
}


def run_demo(
    out_dir: str | Path = "runs/demo", sizes: tuple[int, int, int] = (1800, 300, 300), **overrides: object
) -> dict[str, object]:
    """The end-to-end demo: write the scene data (``sizes`` = train, validation, test images), train with
    :data:`DEMO_CONFIG` (plus ``overrides``), then report test retrieval and zero-shot accuracy on seen and
    held-out (colour, shape) pairs. Returns the numbers it prints, also written to ``<run>/demo.json``."""
    import json

    from clipcraft.evaluation.zeroshot import ZeroShotClassifier
    from clipcraft.model import load
    from clipcraft.train import train
    from clipcraft.train.config import TrainConfig

    start = time.perf_counter()
    out = Path(out_dir)
    data = write_scene_dataset(out / "data", train=sizes[0], val=sizes[1], test=sizes[2])
    config = TrainConfig.from_dict(
        {**DEMO_CONFIG, "data": str(data), "output_dir": str(out / "run"), **overrides}
    )
    result = train(config)
    model = load(result.best_model or result.last_model)
    classes = [f"{c} {s}" for c in COLORS for s in SHAPES]
    classifier = ZeroShotClassifier(
        model, classes, templates=["a {}.", "a photo of a {}.", "a drawing of a {}."]
    )
    rows = [json.loads(line) for line in (data / "test" / "metadata.jsonl").read_text().splitlines()]
    labels, _ = classifier.predict([data / "test" / r["file_name"] for r in rows])
    truth = [f"{r['color']} {r['shape']}" for r in rows]
    held = np.array([(r["color"], r["shape"]) in HELD_OUT for r in rows])
    hits = np.array([p == t for p, t in zip(labels, truth, strict=True)])
    summary = {
        "test_images": len(rows),
        "test_i2t_r1": result.metrics.get("test_i2t_r1"),
        "test_i2t_r5": result.metrics.get("test_i2t_r5"),
        "test_t2i_r1": result.metrics.get("test_t2i_r1"),
        "test_t2i_r5": result.metrics.get("test_t2i_r5"),
        "zeroshot_seen_top1": float(hits[~held].mean()) if (~held).any() else None,
        "zeroshot_heldout_top1": float(hits[held].mean()) if held.any() else None,
        "zeroshot_chance": 1.0 / len(classes),
        "seconds": time.perf_counter() - start,
        "run_dir": str(result.run_dir),
        "model": str(result.best_model or result.last_model),
        "figures": sorted(str(f) for f in result.run_dir.glob("*.png")),
    }
    (result.run_dir / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
