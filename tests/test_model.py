"""The model's contract: typed output, encode_* batching and order, bad input, save/load round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import clipcraft
from clipcraft import ClipOutput, create_model, list_presets, load
from clipcraft.errors import CheckpointError, ClipcraftError, ImageLoadError, UnknownNameError


def test_presets_are_listed_and_unknown_names_suggest_close_ones():
    assert {"seed", "tiny", "minilm-vit-tiny"} <= set(list_presets())
    with pytest.raises(UnknownNameError, match="Did you mean 'tiny'"):
        create_model("tiny2")


def test_forward_returns_one_typed_output(tiny_model):
    images = torch.randn(3, 3, 32, 32)
    tokens = tiny_model.tokenize(["a", "bb", "ccc"])
    out = tiny_model(images, tokens)
    assert isinstance(out, ClipOutput)
    assert out.image_embeddings.shape == (3, 16) and out.text_embeddings.shape == (3, 16)
    torch.testing.assert_close(out.image_embeddings.norm(dim=-1), torch.ones(3))
    assert math.isclose(float(out.logit_scale), 1 / 0.07, rel_tol=1e-5)
    assert float(out.logit_bias) == -10.0
    assert out.logits_per_image().shape == (3, 3)
    only_text = tiny_model(texts=tokens)
    assert only_text.image_embeddings is None
    torch.testing.assert_close(only_text.text_embeddings, out.text_embeddings)


def test_precomputed_features_give_the_same_embeddings(tiny_model):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        direct = tiny_model(images).image_embeddings
        via_features = tiny_model(image_features=tiny_model.image_tower(images)).image_embeddings
    torch.testing.assert_close(direct, via_features)
    with pytest.raises(ClipcraftError, match="not both"):
        tiny_model(images, image_features=torch.zeros(2, 32))


def test_encode_images_keeps_order_and_does_not_depend_on_batch_size(tiny_model, rgb_images, tmp_path):
    paths = []
    for i, img in enumerate(rgb_images[:2]):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    inputs = [paths[0], rgb_images[2], str(paths[1]), rgb_images[3], rgb_images[4]]
    full = tiny_model.encode_images(inputs, batch_size=5)
    assert full.shape == (5, 16) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-5)
    one_by_one = np.concatenate([tiny_model.encode_images([x], batch_size=1) for x in inputs])
    np.testing.assert_allclose(full, one_by_one, atol=1e-5)
    batched = tiny_model.encode_images(inputs, batch_size=2)
    np.testing.assert_allclose(full, batched, atol=1e-5)
    # the paths embed exactly like the same pictures passed as PIL images
    np.testing.assert_allclose(full[0], tiny_model.encode_images([rgb_images[0]])[0], atol=1e-6)


def test_encode_texts_order_and_features(tiny_model):
    texts = ["one", "two two", "three three three"]
    emb = tiny_model.encode_texts(texts)
    assert emb.shape == (3, 16)
    reversed_emb = tiny_model.encode_texts(texts[::-1])
    np.testing.assert_allclose(emb, reversed_emb[::-1], atol=1e-5)
    features = tiny_model.encode_texts(texts, project=False, normalize=False)
    assert features.shape == (3, 32)
    assert not np.allclose(np.linalg.norm(features, axis=1), 1.0)
    assert tiny_model.encode_texts("one").shape == (1, 16)


def test_encode_does_not_leave_the_model_in_eval_mode():
    model = create_model("tiny").train()
    model.encode_texts(["x"])
    assert model.training


def test_bf16_encoding_is_close_to_fp32(tiny_model, rgb_images):
    fp32 = tiny_model.encode_images(rgb_images)
    bf16 = tiny_model.encode_images(rgb_images, precision="bf16")
    assert bf16.dtype == np.float32
    assert (fp32 * bf16).sum(1).min() > 0.98
    with pytest.raises(ClipcraftError, match="precision"):
        tiny_model.encode_texts(["x"], precision="fp8")


# -- bad input -------------------------------------------------------------------------------------------------


def test_empty_inputs_give_empty_arrays(tiny_model):
    assert tiny_model.encode_texts([]).shape == (0, 16)
    assert tiny_model.encode_images([]).shape == (0, 16)
    assert tiny_model.encode_images([], project=False).shape == (0, 32)


def test_non_string_caption_is_a_clear_error(tiny_model):
    with pytest.raises(TypeError, match="item 1 is int"):
        tiny_model.encode_texts(["fine", 3])


def test_unreadable_and_non_image_paths_are_clear_errors(tiny_model, tmp_path):
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        tiny_model.encode_images([tmp_path / "missing.jpg"])
    text = tmp_path / "readme.png"
    text.write_text("hello")
    with pytest.raises(ImageLoadError, match="readme.png"):
        tiny_model.encode_images([text])


def test_grayscale_rgba_and_16_bit_images_are_converted(tiny_model, tmp_path):
    files = []
    gray = Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64) % 251)
    files.append(tmp_path / "gray.png")
    gray.save(files[-1])
    files.append(tmp_path / "rgba.png")
    Image.new("RGBA", (50, 40), (200, 10, 10, 128)).save(files[-1])
    files.append(tmp_path / "deep.png")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(files[-1])
    emb = tiny_model.encode_images(files)
    assert emb.shape == (3, 16) and np.isfinite(emb).all()


def test_over_long_caption_is_truncated_not_an_error(tiny_model):
    long = tiny_model.encode_texts(["a " * 5000])
    assert long.shape == (1, 16) and np.isfinite(long).all()


# -- temperature ------------------------------------------------------------------------------------------------


def test_logit_scale_is_clamped_at_log_100():
    model = create_model("tiny")
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert math.isclose(float(model.logit_scale), math.log(100), rel_tol=1e-6)


# -- save / load -------------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_identical_offline(tmp_path, rgb_images, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(3)
    model = create_model("tiny", overrides={"head.kind": "linear", "embed_dim": 8}).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.3)
    texts = ["a small red circle on the left", "a large blue square"]
    path = model.save(tmp_path / "model")
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "tokenizer", "README.md"}
    again = load(path)
    np.testing.assert_array_equal(again.encode_texts(texts), model.encode_texts(texts))
    np.testing.assert_array_equal(again.encode_images(rgb_images), model.encode_images(rgb_images))
    assert float(again.logit_scale) == pytest.approx(3.3)
    assert again.config == model.config
    config = json.loads((path / "config.json").read_text())
    assert config["model"]["image"]["preprocess"]["input_size"] == [3, 32, 32]
    assert config["model"]["text"]["max_length"] == 64


def test_minilm_model_round_trip_is_bit_identical(tmp_path, minilm_dir):
    model = create_model("minilm-vit-tiny").eval()
    texts = ["a dog on the beach", "two people riding bikes"]
    path = model.save(tmp_path / "m")
    assert (path / "tokenizer" / "tokenizer.json").is_file()
    again = load(path)
    np.testing.assert_array_equal(again.encode_texts(texts), model.encode_texts(texts))


def test_saving_over_an_existing_model_replaces_it_cleanly(tmp_path):
    first = create_model("tiny")
    first.save(tmp_path / "m")
    second = create_model("tiny", overrides={"embed_dim": 12})
    second.save(tmp_path / "m")
    assert load(tmp_path / "m").embed_dim == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old copies left


def test_loading_checks_keys_and_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    path = create_model("tiny").save(tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    state.pop("logit_bias")
    state["extra.weight"] = torch.zeros(1)
    state["image_head.proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert "1 missing: ['logit_bias']" in message
    assert "1 unexpected: ['extra.weight']" in message
    assert "image_head.proj.weight: saved (3, 3)" in message


def test_loading_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load(tmp_path)


def test_config_dict_and_overrides():
    model = create_model(
        clipcraft.create_model("tiny").config.to_dict(), pretrained=False, overrides={"embed_dim": 24}
    )
    assert model.encode_texts(["x"]).shape == (1, 24)
    with pytest.raises(ClipcraftError, match="Unknown config key"):
        create_model("tiny", overrides={"image.nmae": "x"})


def test_import_clipcraft_is_light():
    import subprocess
    import sys

    code = "import sys, clipcraft; print(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_losses_are_reachable_from_the_package():
    import importlib

    losses = importlib.import_module("clipcraft.losses")
    assert "losses" in clipcraft.__all__
    assert clipcraft.losses is losses and clipcraft.losses.clip_loss is losses.clip_loss
    assert callable(losses.clip_loss) and callable(losses.siglip_loss)


def test_smoke_demo_lowers_the_loss(tmp_path):
    from clipcraft.demo import smoke

    result = smoke(out_dir=tmp_path, steps=35)
    assert result["loss_last"] < result["loss_first"] - 0.4
    assert result["reload_identical"]


def test_top_level_names_load_lazily() -> None:
    import subprocess
    import sys

    code = (
        "import sys, clipcraft; heavy = [m for m in ('torch', 'timm', 'transformers', 'faiss') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "from clipcraft import Index, ZeroShotClassifier, TrainConfig, ClipModel; "
        "print(Index.__module__, ZeroShotClassifier.__module__, TrainConfig.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [
        "clipcraft.search.index",
        "clipcraft.evaluation.zeroshot",
        "clipcraft.train.config",
    ]


def test_length_sorted_text_batches_match_one_caption_at_a_time(tiny_model):
    """The fast path (captions batched by length) against the simple one (each caption alone)."""
    rng = np.random.default_rng(0)
    words = ["dog", "a", "running", "through", "the", "green", "grass", "near", "two", "children"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 30, size=23)]
    batched = tiny_model.encode_texts(texts, batch_size=8)
    alone = np.concatenate([tiny_model.encode_texts([t], batch_size=1) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
