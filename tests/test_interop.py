"""Import of foreign dual encoders and the transformers export: parity against the source libraries.

Every source model is a tiny random model built from a config here, saved in its own format, imported through
clipcraft's public entry points and compared with the source library's own feature functions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import clipcraft
from clipcraft.errors import ClipcraftError, PretrainedWeightsError
from clipcraft.towers import byte_tokenizer

CAPTIONS = ["a cat", "a big dog on the beach", "two red cars"]
HF_TEXT = dict(
    vocab_size=261,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,  # the byte tokenizer's [SEP]
)
HF_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).min())


def _pixels(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=HF_TEXT, vision_config=HF_VISION, projection_dim=16))
    with torch.no_grad():
        model.logit_scale.fill_(3.1)
    out = tmp_path_factory.mktemp("hf") / "clip"
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 40},
        "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True,
        "resample": 3,
        "image_mean": [0.4, 0.5, 0.6],
        "image_std": [0.2, 0.25, 0.3],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor))
    return out


@pytest.fixture(scope="module")
def hf_siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=HF_TEXT, vision_config=HF_VISION))
    with torch.no_grad():
        model.logit_scale.fill_(4.8)  # exp 121.5: above CLIP's clamp at 100, as trained SigLIPs are
        model.logit_bias.fill_(-12.5)
    out = tmp_path_factory.mktemp("hf") / "siglip"
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    processor = {
        "image_processor_type": "SiglipImageProcessor",
        "size": {"height": 32, "width": 32},
        "resample": 2,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor))
    return out


def _check_hf_parity(hf, model, tokens, pixels, siglip: bool) -> None:
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=pixels).pooler_output  # (B, D)
        text_kwargs = {"input_ids": tokens["input_ids"]}
        if not siglip:
            text_kwargs["attention_mask"] = tokens["attention_mask"]
        ref_txt = hf.get_text_features(**text_kwargs).pooler_output
        out = model(images=pixels, texts=tokens)
        ref = hf(pixel_values=pixels, **text_kwargs)
    assert _min_cos(F.normalize(ref_img, dim=-1), out.image_embeddings) >= 0.9999
    assert _min_cos(F.normalize(ref_txt, dim=-1), out.text_embeddings) >= 0.9999
    assert float(out.logit_scale) == pytest.approx(float(hf.logit_scale.detach().exp()), rel=1e-6)
    logits = out.logits_per_image() + (out.logit_bias if siglip else 0.0)
    torch.testing.assert_close(logits, ref.logits_per_image, atol=1e-3, rtol=1e-4)


def test_hf_clip_parity_and_round_trip(hf_clip_dir: Path, tmp_path: Path) -> None:
    from transformers import CLIPModel

    hf = CLIPModel.from_pretrained(hf_clip_dir).eval()
    model = clipcraft.load(hf_clip_dir)
    assert model.config.image.kind == model.config.text.kind == "hf_clip"
    pre = model.config.image.preprocess
    assert (
        pre.input_size == (3, 32, 32) and pre.crop_pct == pytest.approx(0.8) and pre.mean == (0.4, 0.5, 0.6)
    )
    tokens = model.tokenize(CAPTIONS)
    assert (
        tokens["attention_mask"][0].sum() < tokens["input_ids"].shape[1]
    )  # padded: EOS pooling finds the end
    _check_hf_parity(hf, model, tokens, _pixels(32), siglip=False)
    # the usual self-describing directory, reloaded offline with the same embeddings
    model.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "README.md").read_text().startswith("---\nlibrary_name: clipcraft")
    again = clipcraft.load(tmp_path / "saved")
    np.testing.assert_allclose(again.encode_texts(CAPTIONS), model.encode_texts(CAPTIONS), atol=1e-6)
    _check_hf_parity(hf, again, again.tokenize(CAPTIONS), _pixels(32), siglip=False)
    # create_model and the hf: prefix go the same way
    via_create = clipcraft.create_model(f"hf:{hf_clip_dir}")
    np.testing.assert_allclose(via_create.encode_texts(CAPTIONS), model.encode_texts(CAPTIONS), atol=1e-6)


def test_hf_siglip_parity(hf_siglip_dir: Path, tmp_path: Path) -> None:
    from transformers import SiglipModel

    hf = SiglipModel.from_pretrained(hf_siglip_dir).eval()
    model = clipcraft.create_model(str(hf_siglip_dir))
    assert model.config.head.kind == "none" and model.config.text.padding == "max_length"
    assert model.config.max_logit_scale >= 4.8  # the clamp after each step keeps SigLIP's temperature
    pre = model.config.image.preprocess
    assert (pre.crop_mode, pre.interpolation, pre.mean) == ("squash", "bilinear", (0.5, 0.5, 0.5))
    tokens = model.tokenize(CAPTIONS)
    assert tokens["input_ids"].shape[1] == 16  # padded to max_length, as SigLIP was trained
    _check_hf_parity(hf, model, tokens, _pixels(32), siglip=True)
    model.save(tmp_path / "saved")
    again = clipcraft.load(tmp_path / "saved")
    assert float(again.logit_bias) == pytest.approx(-12.5)
    _check_hf_parity(hf, again, again.tokenize(CAPTIONS), _pixels(32), siglip=True)


def test_hf_hub_id_offline_is_a_clear_error() -> None:
    with pytest.raises(PretrainedWeightsError, match="hub may be unreachable"):
        clipcraft.create_model("hf:openai/clip-vit-base-patch32")


def test_hf_missing_weights_are_refused(hf_clip_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(hf_clip_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(PretrainedWeightsError):
        clipcraft.load(broken)


# -- open_clip -----------------------------------------------------------------------------------------------

OPEN_CLIP_TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2)


def _open_clip_model(tmp_path: Path, vision_cfg: dict, quick_gelu: bool = False):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    cfg = {"embed_dim": 16, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg, "text_cfg": OPEN_CLIP_TEXT}
    model = open_clip.CLIP(
        embed_dim=16, vision_cfg=vision_cfg, text_cfg=OPEN_CLIP_TEXT, quick_gelu=quick_gelu
    ).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.3)
    arch = tmp_path / "tiny_open_clip.json"
    arch.write_text(json.dumps(cfg))
    ckpt = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), ckpt)
    return open_clip, model, arch, ckpt


def _check_open_clip(open_clip, ref, model, size: int, ids: torch.Tensor | None = None) -> None:
    """``model`` against open_clip model ``ref``; ``ids``: open_clip's tokens (default: its CLIP BPE)."""
    pixels = _pixels(size, 2)
    ids = open_clip.tokenize(CAPTIONS, context_length=16) if ids is None else ids
    tokens = model.tokenize(CAPTIONS)
    n = tokens["input_ids"].shape[1]
    assert torch.equal(tokens["input_ids"], ids[:, :n])  # the same ids as open_clip's tokenizer, unpadded
    with torch.no_grad():
        ref_img, ref_txt = ref.encode_image(pixels, normalize=True), ref.encode_text(ids, normalize=True)
        out = model(images=pixels, texts=tokens)
    assert _min_cos(ref_img, out.image_embeddings) >= 0.9999
    assert _min_cos(ref_txt, out.text_embeddings) >= 0.9999
    assert float(out.logit_scale) == pytest.approx(float(ref.logit_scale.exp()), rel=1e-6)
    torch.testing.assert_close(
        out.logits_per_image(), ref.logit_scale.exp() * ref_img @ ref_txt.T, atol=1e-3, rtol=1e-4
    )


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_vit_parity(tmp_path: Path, quick_gelu: bool) -> None:
    vision = dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16)
    open_clip, ref, arch, ckpt = _open_clip_model(tmp_path, vision, quick_gelu)
    model = clipcraft.create_model(f"open_clip:{arch}", checkpoint=str(ckpt))
    assert model.config.image.kind == "hf_clip" and model.config.source["format"] == "open_clip"
    _check_open_clip(open_clip, ref, model, 32)
    model.save(tmp_path / "saved")  # reloads without open_clip's code: transformers modules only
    again = clipcraft.load(tmp_path / "saved")
    _check_open_clip(open_clip, ref, again, 32)


def test_open_clip_timm_tower_parity(tmp_path: Path) -> None:
    vision = dict(
        timm_model_name="test_vit", timm_model_pretrained=False, timm_pool="avg", timm_proj="linear"
    )
    vision["image_size"] = 160
    open_clip, ref, arch, ckpt = _open_clip_model(tmp_path, vision)
    model = clipcraft.load(f"open_clip:{arch},checkpoint={ckpt}")
    assert model.config.image.kind == "timm" and model.config.image.name == "test_vit"
    _check_open_clip(open_clip, ref, model, 160)


def test_open_clip_names_and_refusals(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    from clipcraft.interop.open_clip import architecture, model_config

    assert architecture("ViT-B-32")["vision_cfg"]["patch_size"] == 32  # open_clip's own table, no download
    config, _ = model_config(architecture("ViT-B-32"), "ViT-B-32", None)
    assert config.image.hf_config["num_attention_heads"] == 12 and config.text.max_length == 77
    with pytest.raises(PretrainedWeightsError, match="checkpoint="):
        clipcraft.create_model("open_clip:ViT-B-32")
    with pytest.raises(ClipcraftError, match="attentional_pool"):
        cfg = architecture("ViT-B-32")
        cfg["vision_cfg"]["attentional_pool"] = True
        model_config(cfg, "x", None)


# open_clip's HFTextEncoder: a transformers model, a pooler and a projection. The checkpoint holds the weights;
# the architecture (config.json) and tokenizer come from the directory named in hf_model_name.
OPEN_CLIP_VIT = dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16)


def _hf_text_dir(root: Path, model_type: str) -> Path:
    """A directory with a tiny transformers text model's config and a byte tokenizer (padding id 0): all that
    open_clip reads from hf_model_name when it builds the tower without pretrained weights."""
    from transformers import AutoConfig

    out = root / model_type
    if model_type == "mt5":  # an encoder-decoder: open_clip keeps its encoder
        sizes = dict(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2)
    else:
        sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=40)  # fmt: skip
    config = AutoConfig.for_model(model_type, vocab_size=261, pad_token_id=0, **sizes)
    config.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def _open_clip_hf_text_model(tmp_path: Path, text_dir: Path, pooler: str, proj: str):
    open_clip = pytest.importorskip("open_clip")
    text = dict(hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir), hf_model_pretrained=False,
                hf_pooler_type=pooler, hf_proj_type=proj, context_length=16)  # fmt: skip
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(embed_dim=16, vision_cfg=OPEN_CLIP_VIT, text_cfg=text).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.3)
    arch = tmp_path / "tiny_hf_text.json"
    arch.write_text(json.dumps({"embed_dim": 16, "vision_cfg": OPEN_CLIP_VIT, "text_cfg": text}))
    ckpt = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), ckpt)
    # what open_clip.get_tokenizer builds for this text_cfg
    ids = open_clip.tokenizer.HFTokenizer(str(text_dir), context_length=16)(CAPTIONS)
    return open_clip, model, arch, ckpt, ids


@pytest.mark.parametrize(
    ("model_type", "pooler", "proj", "pooling", "head"),
    [
        ("roberta", "mean_pooler", "mlp", "mean", "plain_mlp"),  # as open_clip's (xlm-)roberta configs
        ("bert", "cls_pooler", "linear", "pooler", "linear"),  # the model's pooling layer over [CLS]
        ("bert", "cls_last_hidden_state_pooler", "mlp", "cls", "plain_mlp"),
    ],
)
def test_open_clip_hf_text_tower_parity(
    tmp_path: Path, model_type: str, pooler: str, proj: str, pooling: str, head: str
) -> None:
    text_dir = _hf_text_dir(tmp_path, model_type)
    open_clip, ref, arch, ckpt, ids = _open_clip_hf_text_model(tmp_path, text_dir, pooler, proj)
    model = clipcraft.create_model(f"open_clip:{arch}", checkpoint=str(ckpt))
    assert model.config.text.kind == "hf" and model.config.text.pooling == pooling
    assert model.config.head.kind_of("text") == head and model.config.head.kind_of("image") == "linear"
    assert model.config.text.max_length == 16
    _check_open_clip(open_clip, ref, model, 32, ids)
    from clipcraft.interop.hf import export_kind

    with pytest.raises(ClipcraftError, match="cannot be exported"):  # clipcraft's pooling has no HF class
        export_kind(model)
    model.save(tmp_path / "saved")  # reloads from its own files: config, weights and tokenizer
    shutil.rmtree(text_dir)
    again = clipcraft.load(tmp_path / "saved")
    _check_open_clip(open_clip, ref, again, 32, ids)


def test_open_clip_hf_text_tower_refusals(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    from clipcraft.interop.open_clip import architecture, check_hf_padding, model_config

    bert = str(_hf_text_dir(tmp_path, "bert"))

    def config_with(**text: object) -> dict:
        cfg = {"embed_dim": 16, "vision_cfg": OPEN_CLIP_VIT}
        cfg["text_cfg"] = {"hf_model_name": bert, "hf_tokenizer_name": bert, **text}
        return cfg

    config, _ = model_config(config_with(), "x", None)  # open_clip's defaults: mean pooler, mlp projection
    assert (config.text.pooling, config.head.kind_of("text")) == ("mean", "plain_mlp")
    config, _ = model_config(config_with(hf_pooler_type=None), "x", None)  # the architecture's default
    assert config.text.pooling == "pooler"  # open_clip's default for bert: cls_pooler
    # a hub id that cannot be read offline: the checkpoint alone does not define the tower
    cfg = architecture("roberta-ViT-B-32")
    cfg["text_cfg"]["hf_model_name"] = "clipcraft-tests/no-such-text-model"
    with pytest.raises(PretrainedWeightsError, match="not its architecture"):
        model_config(cfg, "roberta-ViT-B-32", None)
    with pytest.raises(ClipcraftError, match="max_pooler"):
        model_config(config_with(hf_pooler_type="max_pooler"), "x", None)
    with pytest.raises(ClipcraftError, match="hf_pooler_type='attn_pooler'"):
        model_config(config_with(hf_pooler_type="attn_pooler"), "x", None)
    with pytest.raises(ClipcraftError, match="hf_proj_type=None"):  # widths differ: open_clip has no proj
        model_config(config_with(hf_proj_type=None), "x", None)
    with pytest.raises(ClipcraftError, match="hf_tokenizer_name"):
        model_config(config_with(hf_tokenizer_name=None), "x", None)
    with pytest.raises(ClipcraftError, match="tokenizer_mode"):
        model_config(config_with(tokenizer_mode="clips"), "x", None)
    with pytest.raises(ClipcraftError, match="encoder-decoder"):
        model_config(config_with(hf_model_name=str(_hf_text_dir(tmp_path, "mt5"))), "x", None)
    config, _ = model_config(config_with(), "x", None)
    config.text.hf_config["pad_token_id"] = 1  # open_clip would attend to the tokenizer's padding
    with pytest.raises(ClipcraftError, match="pads with id 0"):
        check_hf_padding(byte_tokenizer(), config.text)


# -- timm CLIP image tower ---------------------------------------------------------------------------------


def test_timm_clip_image_tower_preset() -> None:
    import timm

    preset = clipcraft.presets.get_preset("clip-vit-b16-minilm")
    assert preset.config.image.name.startswith("vit_base_patch16_clip_224.")
    tiny = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8)
    text = {"text.hf_config": {"model_type": "bert", "vocab_size": 261, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64}, "text.tokenizer": "bytes"}  # fmt: skip
    torch.manual_seed(0)
    model = clipcraft.create_model(
        "clip-vit-b16-minilm", pretrained=False, overrides={"image.model_kwargs": tiny, **text}
    ).eval()
    ref = timm.create_model(preset.config.image.name, pretrained=False, num_classes=0, **tiny).eval()
    ref.load_state_dict(model.image_tower.trunk.state_dict())
    # the tower's preprocessing is timm's CLIP config (OpenAI mean/std), not ImageNet's
    pre = model.config.image.preprocess
    assert pre.mean == tuple(ref.pretrained_cfg["mean"]) == pytest.approx((0.4815, 0.4578, 0.4082), abs=1e-4)
    assert pre.std == tuple(ref.pretrained_cfg["std"]) and pre.input_size == (3, 32, 32)
    pixels = _pixels(32)
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(pixels), pre_logits=True)
        assert _min_cos(expected, model.image_tower(pixels)) >= 0.9999
    with pytest.raises(PretrainedWeightsError):  # offline: the real weights cannot be fetched
        clipcraft.create_model("clip-vit-b16-minilm", overrides={"image.model_kwargs": tiny, **text})


# -- export to transformers --------------------------------------------------------------------------------


def _check_export(model, out: Path, cls_name: str, siglip: bool = False) -> None:
    from transformers import AutoModel, AutoTokenizer

    hf = AutoModel.from_pretrained(out).eval()
    assert type(hf).__name__ == cls_name
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(
        CAPTIONS,
        padding="max_length" if siglip else True,
        truncation=True,
        max_length=model.config.text.max_length,
        return_tensors="pt",
    )
    pixels = _pixels(32)
    with torch.no_grad():
        kwargs = {"input_ids": ids["input_ids"]}
        if not siglip:
            kwargs["attention_mask"] = ids["attention_mask"]
        img = hf.get_image_features(pixel_values=pixels)
        txt = hf.get_text_features(**kwargs)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        ours = model(images=pixels, texts=model.tokenize(CAPTIONS))
    assert _min_cos(F.normalize(img, dim=-1), ours.image_embeddings) >= 0.9999
    assert _min_cos(F.normalize(txt, dim=-1), ours.text_embeddings) >= 0.9999
    assert float(hf.logit_scale.exp()) == pytest.approx(float(ours.logit_scale), rel=1e-6)
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == list(
        model.config.image.preprocess.mean
    )
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: transformers")


def test_export_hf_clip_and_siglip(hf_clip_dir: Path, hf_siglip_dir: Path, tmp_path: Path) -> None:
    from clipcraft.interop.hf import export_hf

    clip = clipcraft.load(hf_clip_dir)
    export_hf(clip, tmp_path / "clip")
    _check_export(clip, tmp_path / "clip", "CLIPModel")
    siglip = clipcraft.load(hf_siglip_dir)
    export_hf(siglip, tmp_path / "siglip")
    _check_export(siglip, tmp_path / "siglip", "SiglipModel", siglip=True)
    with pytest.raises(ClipcraftError, match="exists"):
        export_hf(clip, tmp_path / "clip")


def test_export_hf_dual_encoder_for_mixed_towers(
    hf_siglip_dir: Path, hf_clip_dir: Path, tmp_path: Path
) -> None:
    from clipcraft.interop.hf import export_hf

    siglip, clip = clipcraft.load(hf_siglip_dir), clipcraft.load(hf_clip_dir)
    config = clip.config
    config.image = siglip.config.image  # a SigLIP image tower beside a CLIP text tower, linear heads
    torch.manual_seed(0)
    mixed = clipcraft.ClipModel(config).eval()
    mixed.text_tower.tokenizer = clip.tokenizer
    export_hf(mixed, tmp_path / "mixed")
    _check_export(mixed, tmp_path / "mixed", "VisionTextDualEncoderModel")


def test_export_hf_refuses_timm_and_mlp(tiny_model, tmp_path: Path) -> None:
    from clipcraft.cli import main
    from clipcraft.interop.hf import export_hf

    with pytest.raises(ClipcraftError, match="timm model.*mlp heads"):
        export_hf(tiny_model, tmp_path / "x")
    tiny_model.save(tmp_path / "tiny")
    assert main(["export", "hf", "--model", str(tmp_path / "tiny"), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()


def test_export_hf_refuses_a_text_head_unlike_the_image_head(hf_clip_dir: Path) -> None:
    from clipcraft.interop.hf import export_kind

    clip = clipcraft.load(hf_clip_dir)
    assert export_kind(clip) == "clip"
    clip.config.head.text_kind = "plain_mlp"  # as an open_clip HF text tower's projection
    with pytest.raises(ClipcraftError, match="linear and plain_mlp heads"):
        export_kind(clip)


def test_model_card_describes_the_run(tiny_model, tmp_path: Path) -> None:
    import yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"data": "../shared/data/flickr8k", "epochs": 3, "loss": "clip"})
    )
    (run / "summary.json").write_text(
        json.dumps({"metrics": {"test_t2i_r1": 0.125, "test_mean_recall": 0.25}})
    )
    tiny_model.save(run / "best")
    card = (run / "best" / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n")[2]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "clipcraft" and meta["datasets"] == ["jxie/flickr8k"]
    assert "| test_t2i_r1 | 0.1250 |" in body and "epochs=3" in body
    assert "vit_tiny_patch16_224" in body and "clipcraft.load" in body
    tiny_model.save(tmp_path / "alone")  # no run: no invented data or metrics
    alone = (tmp_path / "alone" / "README.md").read_text()
    assert "datasets:" not in alone and "No training run recorded" in alone


def test_create_command_imports_and_saves(hf_clip_dir: Path, tmp_path: Path) -> None:
    from clipcraft.cli import main

    assert main(["create", "--preset", str(hf_clip_dir), "--out", str(tmp_path / "m")]) == 0
    saved = clipcraft.load(tmp_path / "m")
    assert saved.config.source["format"] == "transformers" and (tmp_path / "m" / "README.md").is_file()
    assert main(["create", "--preset", "hf:no-such/model", "--out", str(tmp_path / "x")]) == 2


def test_hf_towers_of_a_config_load_their_pretrained_weights(hf_clip_dir: Path) -> None:
    import copy

    imported = clipcraft.load(hf_clip_dir)
    config = copy.deepcopy(imported.config)
    config.head.kind = "mlp"  # new heads on the pretrained towers: a preset-style use of the hf tower kinds
    fresh = clipcraft.create_model(config).eval()
    pixels, tokens = _pixels(32), imported.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(fresh.image_tower(pixels), imported.image_tower(pixels))
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        torch.testing.assert_close(fresh.text_tower(ids, mask), imported.text_tower(ids, mask))
    config.image.name = str(hf_clip_dir / "missing")
    with pytest.raises(PretrainedWeightsError):
        clipcraft.create_model(config)
