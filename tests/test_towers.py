"""Towers: real MiniLM parity with sentence-transformers, the seed architecture offline, pooling, locking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipcraft import create_model
from clipcraft.config import ImageTowerConfig, TextTowerConfig
from clipcraft.errors import ClipcraftError, PretrainedWeightsError, UnknownNameError
from clipcraft.towers import ImageTower, TextTower, pool, read_sentence_transformers_dir

SENTENCES = [
    "A dog runs across the grass.",
    "Two children, one in red, play on a beach at sunset.",
    "",
    "word " * 600,  # longer than max_seq_length: truncated by both
    "Ünïcödé and emoji 🐕 are fine too",
]


def test_minilm_text_tower_matches_sentence_transformers(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    model = create_model("minilm-vit-tiny")
    ours = model.encode_texts(SENTENCES, project=False, normalize=False)
    assert ours.shape == (len(SENTENCES), 384)
    cos = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() >= 0.9999, cos
    # the sentence-transformers directory's settings were honoured, not defaults
    assert model.config.text.pooling == "mean"
    assert model.config.text.max_length == 256
    assert model.config.text.normalize_features is True


@pytest.mark.slow
def test_seed_preset_builds_offline_with_the_published_shapes():
    model = create_model("seed", pretrained=False)
    image_params = sum(p.numel() for p in model.image_tower.parameters())
    text_params = sum(p.numel() for p in model.text_tower.parameters())
    assert round(image_params / 1e6, 1) == 85.8
    assert model.image_tower.num_features == 768
    assert 108e6 < text_params < 110e6
    assert model.text_tower.num_features == 768
    assert model.image_head.proj.out_features == 512 and model.text_head.proj.out_features == 512
    pre = model.config.image.preprocess
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert pre.input_size == (3, 224, 224) and pre.interpolation == "bicubic"
    # pooled features, never the 1000-class logits
    with torch.no_grad():
        features = model.image_tower(torch.zeros(1, 3, 224, 224))
    assert features.shape == (1, 768)
    assert not any(n == "head.weight" for n, _ in model.image_tower.trunk.named_parameters())


def test_image_tower_gives_pooled_features_and_its_own_data_config():
    tower = ImageTower(
        ImageTowerConfig(name="resnet18", model_kwargs={"layers": [1, 1, 1, 1]}), pretrained=False
    )
    assert tower.num_features == 512
    assert tower(torch.zeros(2, 3, 64, 64)).shape == (2, 512)
    # resnet18's checkpoint config uses the ImageNet constants, not 0.5: it comes from timm, not from us
    assert tower.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))


def test_unknown_image_tower_lists_close_names():
    with pytest.raises(UnknownNameError, match="vit_base_patch16_224"):
        ImageTower(ImageTowerConfig(name="vit_base_patch16_22"))


def test_unknown_text_tower_without_files_lists_known_names():
    with pytest.raises(UnknownNameError, match="all-mpnet-base-v2"):
        TextTower(TextTowerConfig(name="sentence-transformers/all-mpnet-base"), pretrained=False)


def test_pretrained_weights_that_cannot_be_fetched_raise_not_fall_back():
    with pytest.raises(PretrainedWeightsError, match="local"):
        create_model("tiny", pretrained=True)
    with pytest.raises(PretrainedWeightsError, match="not found"):
        create_model("tiny", image_checkpoint="/nonexistent/weights.safetensors")


def test_image_tower_loads_a_local_checkpoint_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = create_model("tiny")
    trunk_state = {k: v.contiguous() for k, v in source.image_tower.trunk.state_dict().items()}
    save_file(trunk_state, str(tmp_path / "vit.safetensors"))
    torch.manual_seed(2)  # a different random init, so equality can only come from the file
    loaded = create_model("tiny", image_checkpoint=str(tmp_path / "vit.safetensors"))
    for name, value in loaded.image_tower.trunk.state_dict().items():
        assert torch.equal(value, trunk_state[name]), name


def test_pooling_modes_on_a_hand_made_batch():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])  # (1, 3, 2); last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 4.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 6.0]]
    with pytest.raises(KeyError):
        pool(hidden, mask, "weighted")


def test_pooler_pooling_is_the_models_pooling_layer():
    tiny = dict(
        vocab_size=261, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    settings = dict(name="tiny-bert", tokenizer="bytes", pooling="pooler", max_length=16)
    tower = TextTower(TextTowerConfig(hf_config={"model_type": "bert", **tiny}, **settings)).eval()
    tokens = tower.tokenize(["a cat", "a big dog on the beach"])
    with torch.no_grad():
        hidden = tower.model(**tokens).last_hidden_state  # (B, L, H)
        expected = torch.tanh(tower.model.pooler.dense(hidden[:, 0]))  # BERT's pooler over [CLS]
        torch.testing.assert_close(tower(tokens["input_ids"], tokens["attention_mask"]), expected)
    distil = dict(model_type="distilbert", vocab_size=261, dim=16, hidden_dim=32, n_layers=1, n_heads=2)
    with pytest.raises(ClipcraftError, match="no pooling layer"):
        TextTower(TextTowerConfig(hf_config=distil, **settings))


def _st_dir(tmp_path, pooling: str, extra_module: str | None = None):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if extra_module:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_X", "type": f"sentence_transformers.models.{extra_module}"}
        )
    (tmp_path / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{m}": m.startswith(pooling) for m in ("cls_token", "mean_tokens", "max_tokens")}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8, **flags}))
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 77, "do_lower_case": True})
    )
    return tmp_path


def test_sentence_transformers_settings_are_read(tmp_path):
    settings = read_sentence_transformers_dir(_st_dir(tmp_path, "cls", "Normalize"))
    assert settings == {"pooling": "cls", "normalize_features": True, "max_length": 77, "lowercase": True}


def test_unsupported_sentence_transformers_module_is_an_error(tmp_path):
    with pytest.raises(ClipcraftError, match="Dense"):
        read_sentence_transformers_dir(_st_dir(tmp_path, "mean", "Dense"))


def test_minilm_weights_are_checked_against_the_published_sha256(minilm_dir, monkeypatch):
    from clipcraft import towers

    monkeypatch.setattr(towers, "MINILM_SHA256", "0" * 64)
    with pytest.raises(PretrainedWeightsError, match="sha256"):
        towers.resolve_text_source(towers.MINILM_HUB_ID)


def test_long_captions_are_truncated_to_max_length(tiny_model):
    tokens = tiny_model.tokenize(["x" * 1000, "short"])
    assert tokens["input_ids"].shape == (2, tiny_model.config.text.max_length)
    assert tokens["attention_mask"][1].sum() == len("short") + 2  # bytes + [CLS] + [SEP]


# -- locking ---------------------------------------------------------------------------------------------------


def _backward(model):
    images = torch.randn(2, 3, 32, 32)
    tokens = model.tokenize(["a red circle", "a blue square"])
    out = model(images, tokens)
    (out.image_embeddings.sum() + out.text_embeddings.sum()).backward()


def test_fully_locked_towers_get_no_gradient_and_stay_in_eval_mode():
    model = create_model("tiny", overrides={"image.lock": True, "text.lock": True, "head.dropout": 0.1})
    model.train()
    assert not model.image_tower.training and not model.text_tower.training
    assert all(not m.training for m in model.image_tower.modules())
    assert model.image_head.training  # heads still train
    _backward(model)
    assert all(p.grad is None for p in model.image_tower.parameters())
    assert all(p.grad is None for p in model.text_tower.parameters())
    assert model.image_head.proj.weight.grad is not None


def test_partial_lock_leaves_the_last_blocks_trainable():
    model = create_model(
        "tiny",
        overrides={
            "image.lock": True,
            "image.unlocked_groups": 1,
            "text.lock": True,
            "text.unlocked_groups": 1,
        },
    )
    model.train()
    trunk = model.image_tower.trunk
    assert not trunk.patch_embed.proj.weight.requires_grad
    assert not any(p.requires_grad for p in trunk.blocks[0].parameters())
    assert all(p.requires_grad for p in trunk.blocks[1].parameters())
    tail = [p for m in (trunk.norm, trunk.fc_norm) for p in m.parameters()]  # after the last block
    assert tail and all(p.requires_grad for p in tail)  # trains with the unlocked blocks
    assert not trunk.blocks[0].training and trunk.blocks[1].training
    bert = model.text_tower.model
    assert not any(p.requires_grad for p in bert.embeddings.parameters())
    assert not any(p.requires_grad for p in bert.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in bert.encoder.layer[1].parameters())
    _backward(model)
    assert trunk.blocks[0].attn.qkv.weight.grad is None
    assert trunk.blocks[1].attn.qkv.weight.grad is not None
    assert bert.encoder.layer[1].attention.self.query.weight.grad is not None


def test_unlocking_more_blocks_than_exist_is_an_error():
    with pytest.raises(ClipcraftError, match="only 2 blocks"):
        create_model("tiny", overrides={"image.lock": True, "image.unlocked_groups": 3})


def test_training_transform_flips_only_when_asked(tiny_model):
    """No flip by default (captions say "left" and "right"); hflip=1 always flips; eval never flips."""
    from PIL import Image

    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32] = 255  # white left half
    image = Image.fromarray(pixels)
    whole = (1.0, 1.0)  # crop the whole image, so only the flip can move the white half

    def left_is_bright(transform) -> bool:
        torch.manual_seed(0)
        x = transform(image)
        half = x.shape[-1] // 2
        return bool(x[..., :half].mean() > x[..., half:].mean())

    assert left_is_bright(tiny_model.image_transform(train=True, scale=whole))
    assert not left_is_bright(tiny_model.image_transform(train=True, scale=whole, hflip=1.0))
    assert left_is_bright(tiny_model.image_transform(train=False, hflip=1.0))


def test_patch_dropout_keeps_a_fraction_of_patches_in_training_and_all_of_them_in_eval():
    config = ImageTowerConfig(
        name="vit_tiny_patch16_224",
        model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
    )
    torch.manual_seed(0)
    tower = ImageTower(config)
    plain = ImageTower(config)
    plain.load_state_dict(tower.state_dict())
    seen: list[int] = []
    tower.trunk.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    tower.set_patch_dropout(0.75)
    images = torch.randn(3, 3, 32, 32)
    tower.train()
    tower(images)
    assert seen == [1 + 4]  # the class token and a quarter of the 16 patches
    tower.eval()
    plain.eval()
    assert torch.equal(tower(images), plain(images)) and seen[-1] == 1 + 16
    tower.set_patch_dropout(0.0)
    assert isinstance(tower.trunk.patch_drop, torch.nn.Identity)
    for bad in (1.0, -0.1):
        with pytest.raises(ClipcraftError, match=r"\[0, 1\)"):
            tower.set_patch_dropout(bad)
    cnn = ImageTower(ImageTowerConfig(name="resnet18", model_kwargs={"layers": [1, 1, 1, 1]}))
    with pytest.raises(ClipcraftError, match="vision transformer"):
        cnn.set_patch_dropout(0.5)


def test_channels_last_gives_the_default_layouts_features_and_saves_contiguous_weights() -> None:
    config = ImageTowerConfig(name="resnet18d", model_kwargs={"layers": [1, 1, 1, 1]})
    torch.manual_seed(0)
    tower = ImageTower(config).eval()
    plain = ImageTower(config).eval()
    plain.load_state_dict(tower.state_dict())
    tower.set_channels_last(True)
    conv = tower.trunk.conv1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    seen: list[bool] = []
    tower.trunk.conv1[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), plain(images), rtol=1e-4, atol=1e-5)
    assert seen == [True]  # the batch itself was laid out NHWC
    assert all(
        torch.equal(a, b)
        for a, b in zip(tower.state_dict().values(), plain.state_dict().values(), strict=True)
    )
    tower.train()
    plain.train()
    batch = torch.randn(8, 3, 64, 64)
    tower(batch).square().sum().backward()
    plain(batch).square().sum().backward()
    # Training mode, all gradients as one vector: batch norm over 8 images' 2x2 last-stage maps divides by small
    # variances and magnifies the rounding in a few channels (up to ~2% of an element), so single elements are
    # not compared; a wrong layout would be off by the gradient's whole size.
    grads = [torch.cat([p.grad.flatten() for p in t.parameters()]) for t in (tower, plain)]
    assert (grads[0] - grads[1]).norm() <= 1e-2 * grads[1].norm()  # measured: 2.3e-3
    tower.set_channels_last(False)
    assert tower.trunk.conv1[0].weight.is_contiguous()


@pytest.mark.parametrize(
    "name",
    ["resnet18", "convnext_atto", "mobilenetv3_small_050", "mobilenetv4_conv_small", "efficientnet_b0"],
)
def test_convolutional_image_towers_embed_and_train(name: str) -> None:
    """Convolutional timm towers (random init) as the image tower: the feature width the head expects, an
    embedding through the one encoder equal to the plain forward, and gradients in a loss step."""
    import numpy as np

    from clipcraft import create_model
    from clipcraft.encoding import EncodeSettings, encode_images, shortcut_unavailable
    from clipcraft.losses import clip_loss

    torch.manual_seed(0)
    model = create_model("tiny", overrides={"image.name": name, "image.model_kwargs": {}})
    assert shortcut_unavailable(model) is not None  # no class token: the full tower always runs
    pixels = torch.randn(4, 3, 64, 64)
    features = model.image_tower(pixels)
    assert features.shape == (4, model.image_tower.num_features)
    model.eval()
    with torch.no_grad():
        plain = torch.nn.functional.normalize(model.image_head(model.image_tower(pixels)), dim=-1).numpy()
    encoded = encode_images(model, pixels, EncodeSettings(batch_size=2)).vectors
    np.testing.assert_allclose(encoded, plain, rtol=1e-4, atol=1e-5)
    model.train()
    out = model(images=pixels, texts=model.tokenize(["a", "b", "c", "d"]))
    clip_loss(out.image_embeddings, out.text_embeddings, out.logit_scale).backward()
    grads = [p.grad for p in model.image_tower.parameters() if p.requires_grad]
    assert (
        grads
        and all(g is not None for g in grads[:1])
        and any(g.abs().sum() > 0 for g in grads if g is not None)
    )
