"""transformers ``CLIPModel`` / ``SiglipModel`` in, and out again.

Import: the towers become ``hf_clip`` / ``hf_siglip`` towers (a ``CLIPVisionModel`` / ``SiglipVisionModel`` and
a ``CLIPTextModel`` / ``SiglipTextModel``, each pooled its own way), CLIP's two bias-free projections become
linear heads, SigLIP's towers (which end in their own heads) get ``none`` heads; logit scale and bias, the
tokenizer and the image processor's size/mean/std/crop/interpolation are carried over.

Export: a clipcraft model whose towers are both transformers CLIP/SigLIP models is written as the matching
``CLIPModel`` / ``SiglipModel``, or, for other pairs of such towers, as a ``VisionTextDualEncoderModel``;
transformers loads the directory without clipcraft. Anything else (a timm image tower, an MLP head, a
mean-pooled sentence-transformers text tower) is refused with the reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipcraft.config import HeadConfig, ImageTowerConfig, ModelConfig, PreprocessConfig, TextTowerConfig
from clipcraft.errors import ClipcraftError, PretrainedWeightsError
from clipcraft.files import atomic_dir
from clipcraft.towers import _quiet_transformers, hf_default_preprocess

MODEL_TYPES = {"clip": "hf_clip", "siglip": "hf_siglip"}  # transformers model_type -> clipcraft tower kind
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_RESAMPLE_IDS = {v: k for k, v in _RESAMPLE.items()}

# clipcraft state-dict prefixes <-> those of a transformers dual encoder
_TOWER_PREFIXES = {"image_tower.trunk.": "vision_model.", "text_tower.model.": "text_model."}


def is_hf_dual_encoder_dir(path: str) -> bool:
    """A local directory whose ``config.json`` is a transformers CLIP or SigLIP dual encoder."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") in MODEL_TYPES


def preprocess_from_processor(data: dict[str, Any], kind: str, image_size: int) -> PreprocessConfig:
    """A transformers image processor config (``preprocessor_config.json``) as a :class:`PreprocessConfig`.

    ``size={"shortest_edge": S}`` + centre crop (h, w): resize the short side to S, crop -> crop_pct h/S.
    ``size={"height": H, "width": W}``: squash to (H, W) (SigLIP), then a centre crop if asked.
    Keys that are absent take that processor's defaults.
    """
    base = hf_default_preprocess(kind, image_size)
    size = data.get("size") or {}
    crop = data.get("crop_size") or {}
    do_crop = bool(data.get("do_center_crop", kind == "hf_clip"))
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        out_h, out_w = (int(crop["height"]), int(crop["width"])) if do_crop and crop else (edge, edge)
        crop_pct, mode = out_h / edge, "center"
    elif "height" in size:
        h, w = int(size["height"]), int(size["width"])
        out_h, out_w = (int(crop["height"]), int(crop["width"])) if do_crop and crop else (h, w)
        crop_pct, mode = out_h / h, "squash"
    else:
        out_h, out_w = base.input_size[1:]
        crop_pct, mode = base.crop_pct, base.crop_mode
    normalize = data.get("do_normalize", True)
    mean = tuple(data.get("image_mean", base.mean)) if normalize else (0.0, 0.0, 0.0)
    std = tuple(data.get("image_std", base.std)) if normalize else (1.0, 1.0, 1.0)
    resample = data.get("resample")
    interpolation = (
        _RESAMPLE.get(int(resample), base.interpolation) if resample is not None else base.interpolation
    )
    return PreprocessConfig(
        input_size=(3, out_h, out_w),
        mean=tuple(float(x) for x in mean),  # type: ignore[arg-type]
        std=tuple(float(x) for x in std),  # type: ignore[arg-type]
        interpolation=interpolation,
        crop_pct=float(crop_pct),
        crop_mode=mode,
    )


def _read_processor(source: str) -> dict[str, Any] | None:
    from transformers.utils import cached_file

    with _quiet_transformers():
        try:
            path = cached_file(
                source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
            )
        except OSError:
            return None
    return json.loads(Path(path).read_text()) if path else None


def import_hf(source: str) -> Any:
    """A ClipModel from a transformers ``CLIPModel`` / ``SiglipModel`` directory or hub id.

    Raises :class:`~clipcraft.errors.PretrainedWeightsError` when the config, weights or tokenizer cannot be
    read (offline hub, missing files) or weights are missing: never random weights.
    """
    from transformers import AutoConfig, AutoModel

    from clipcraft.model import ClipModel, load_checked
    from clipcraft.towers import load_tokenizer

    hint = (
        "The model hub may be unreachable: download the model elsewhere (save_pretrained directory with "
        "config.json, weights, tokenizer and preprocessor_config.json) and pass the local directory."
    )
    with _quiet_transformers():
        try:
            hf_config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise PretrainedWeightsError(f"Could not read the config of {source!r}: {exc}\n{hint}") from exc
        kind = MODEL_TYPES.get(hf_config.model_type)
        if kind is None:
            raise ClipcraftError(
                f"{source!r} is a transformers {hf_config.model_type!r} model; clipcraft imports "
                f"{sorted(MODEL_TYPES)} dual encoders."
            )
        try:
            hf, info = AutoModel.from_pretrained(source, output_loading_info=True)
        except OSError as exc:
            raise PretrainedWeightsError(f"Could not load weights of {source!r}: {exc}\n{hint}") from exc
    if info.get("missing_keys"):
        raise PretrainedWeightsError(
            f"{source!r}: weights missing for {len(info['missing_keys'])} parameter(s), e.g. "
            f"{sorted(info['missing_keys'])[:5]}; refusing to use randomly initialised layers."
        )
    tokenizer = load_tokenizer(source, source)
    processor = _read_processor(source) or {}
    config = model_config(hf.config, kind, source, processor)
    model = ClipModel(config)
    load_checked(model, state_from_hf(hf.state_dict(), model), f"{source} (transformers {type(hf).__name__})")
    model.text_tower.tokenizer = tokenizer
    return model


def model_config(hf_config: Any, kind: str, source: str, processor: dict[str, Any]) -> ModelConfig:
    """The clipcraft :class:`ModelConfig` of a transformers CLIP/SigLIP config and its image processor."""
    vision = hf_config.vision_config.to_dict()
    text = hf_config.text_config.to_dict()
    image_size = int(vision["image_size"])
    if kind == "hf_clip":
        embed_dim, head = int(hf_config.projection_dim), HeadConfig(kind="linear", dropout=0.0)
        scale = float(getattr(hf_config, "logit_scale_init_value", math.log(1 / 0.07)))
    else:
        embed_dim, head = int(vision["hidden_size"]), HeadConfig(kind="none", dropout=0.0)
        scale = math.log(10.0)
    return ModelConfig(
        image=ImageTowerConfig(
            kind=kind,
            name=source,
            hf_config=vision,
            preprocess=preprocess_from_processor(processor, kind, image_size),
        ),
        text=TextTowerConfig(
            kind=kind,
            name=source,
            hf_config=text,
            padding="max_length" if kind == "hf_siglip" else "longest",
            max_length=int(text.get("max_position_embeddings", 77)),
            normalize_features=False,
            lowercase=False,
        ),
        head=head,
        embed_dim=embed_dim,
        init_logit_scale=scale,
        source={"format": "transformers", "name": source, "class": type(hf_config).__name__},
    )


def _rename(state: dict[str, Tensor], mapping: dict[str, str]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in mapping.items():
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            out[key] = value
    return out


def _clip_extra_prefix(model: Any) -> dict[str, str]:
    """clipcraft -> transformers prefixes of the towers (transformers >= 5: a dual encoder's ``vision_model``
    is the CLIPVisionModel itself, so ``image_tower.trunk.X`` <-> ``vision_model.X``)."""
    del model
    return dict(_TOWER_PREFIXES)


def state_from_hf(hf_state: dict[str, Tensor], model: Any) -> dict[str, Tensor]:
    """A transformers CLIPModel/SiglipModel state dict renamed onto clipcraft's ``model`` (0-d scale/bias)."""
    inverse = {v: k for k, v in _clip_extra_prefix(model).items()}
    state = _rename(dict(hf_state), inverse)
    if "visual_projection.weight" in state:
        state["image_head.proj.weight"] = state.pop("visual_projection.weight")
        state["text_head.proj.weight"] = state.pop("text_projection.weight")
    state["logit_scale"] = state["logit_scale"].reshape(())
    bias = state.get("logit_bias")
    state["logit_bias"] = bias.reshape(()) if bias is not None else model.logit_bias.detach().clone()
    expected = model.state_dict()
    for key in list(
        state
    ):  # non-persistent buffers (position ids) that one side keeps and the other does not
        if key not in expected and key.endswith("position_ids"):
            del state[key]
    for key in expected:
        if key not in state and key.endswith("position_ids"):
            state[key] = expected[key]
    return state


# ----------------------------------------------------------------------------------------------------------
# Export


def export_kind(model: Any) -> str:
    """``"clip"``, ``"siglip"`` or ``"dual_encoder"``: the transformers class :func:`export_hf` would write.

    Raises :class:`~clipcraft.errors.ClipcraftError` saying why the model cannot be written as one.
    """
    cfg = model.config
    why = []
    if cfg.image.kind not in MODEL_TYPES.values():
        why.append(
            f"its image tower is a {cfg.image.kind} model ({cfg.image.name}); transformers has no class for it"
        )
    if cfg.text.kind not in MODEL_TYPES.values():
        why.append(
            f"its text tower is a {cfg.text.kind} model pooled by clipcraft ({cfg.text.pooling}), which "
            "transformers' dual encoders do not reproduce"
        )
    kinds = sorted({cfg.head.kind_of("image"), cfg.head.kind_of("text")})
    if set(kinds) - {"linear", "none"} or len(kinds) > 1:
        why.append(
            f"its heads are {' and '.join(kinds)} heads; transformers dual encoders project both towers "
            "linearly"
        )
    if why:
        raise ClipcraftError(
            "This model cannot be exported as a transformers model: "
            + "; ".join(why)
            + ". Export it to ONNX (clipcraft export onnx) or keep the clipcraft directory."
        )
    if cfg.image.kind == cfg.text.kind == "hf_clip" and cfg.head.kind == "linear":
        return "clip"
    if cfg.image.kind == cfg.text.kind == "hf_siglip" and cfg.head.kind == "none":
        return "siglip"
    return "dual_encoder"


def _processor_json(preprocess: PreprocessConfig, kind: str) -> dict[str, Any]:
    _, h, w = preprocess.input_size
    data: dict[str, Any] = {
        "do_convert_rgb": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(preprocess.mean),
        "image_std": list(preprocess.std),
        "do_resize": True,
        "resample": _RESAMPLE_IDS.get(preprocess.interpolation, 3),
    }
    if preprocess.crop_mode == "squash":
        size_h, size_w = round(h / preprocess.crop_pct), round(w / preprocess.crop_pct)
        data.update(size={"height": size_h, "width": size_w}, do_center_crop=(size_h, size_w) != (h, w))
        data["crop_size"] = {"height": h, "width": w}
        data["image_processor_type"] = "SiglipImageProcessor" if kind == "siglip" else "CLIPImageProcessor"
    elif preprocess.crop_mode == "center":
        data.update(
            size={"shortest_edge": math.floor(h / preprocess.crop_pct)},
            do_center_crop=True,
            crop_size={"height": h, "width": w},
            image_processor_type="CLIPImageProcessor",
        )
    else:
        raise ClipcraftError(f"crop mode {preprocess.crop_mode!r} has no transformers image processor.")
    if kind == "siglip" and data["image_processor_type"] != "SiglipImageProcessor":
        data["image_processor_type"] = "CLIPImageProcessor"
    return data


def to_hf_model(model: Any) -> Any:
    """The transformers model (``CLIPModel``, ``SiglipModel`` or ``VisionTextDualEncoderModel``) with
    ``model``'s weights; its ``get_image_features`` / ``get_text_features`` equal ``model``'s projected
    features (before normalisation). Refuses models transformers cannot express (see :func:`export_kind`)."""
    from transformers import AutoConfig

    from clipcraft.model import load_checked

    kind = export_kind(model)
    cfg = model.config
    vision = AutoConfig.for_model(**cfg.image.hf_config).to_dict()
    text = AutoConfig.for_model(**cfg.text.hf_config).to_dict()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state = _rename(state, _clip_extra_prefix(model))
    scale, bias = state.pop("logit_scale"), state.pop("logit_bias")
    with _quiet_transformers():
        if kind == "clip":
            from transformers import CLIPConfig, CLIPModel

            config = CLIPConfig(
                text_config=text,
                vision_config=vision,
                projection_dim=cfg.embed_dim,
                logit_scale_init_value=float(scale),
            )
            hf = CLIPModel(config)
            state["visual_projection.weight"] = state.pop("image_head.proj.weight")
            state["text_projection.weight"] = state.pop("text_head.proj.weight")
            state["logit_scale"] = scale.reshape(hf.logit_scale.shape)
        elif kind == "siglip":
            from transformers import SiglipConfig, SiglipModel

            hf = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
            state["logit_scale"] = scale.reshape(hf.logit_scale.shape)
            state["logit_bias"] = bias.reshape(hf.logit_bias.shape)
        else:
            from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

            config = VisionTextDualEncoderConfig.from_vision_text_configs(
                AutoConfig.for_model(**cfg.image.hf_config),
                AutoConfig.for_model(**cfg.text.hf_config),
                projection_dim=cfg.embed_dim,
                logit_scale_init_value=float(scale),
            )
            hf = VisionTextDualEncoderModel(config)
            for side, ours in (("visual_projection", "image_head"), ("text_projection", "text_head")):
                weight = state.pop(f"{ours}.proj.weight", None)
                if weight is None:  # a none head is an identity projection
                    weight = torch.eye(cfg.embed_dim)
                state[f"{side}.weight"] = weight
            state["logit_scale"] = scale.reshape(hf.logit_scale.shape)
        expected = hf.state_dict()
        for key in [k for k in state if k not in expected and k.endswith("position_ids")]:
            del state[key]
        for key in [k for k in expected if k not in state and k.endswith("position_ids")]:
            state[key] = expected[key]
        load_checked(hf, state, f"the {type(hf).__name__} export")
    return hf.eval()


def export_hf(model: Any, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` as a transformers directory at ``out`` (weights, config, tokenizer, image processor).

    ``transformers.AutoModel.from_pretrained(out)`` then loads it without clipcraft. Written atomically;
    an existing ``out`` is refused unless ``overwrite``. Raises :class:`ClipcraftError` for models
    transformers cannot express (see :func:`export_kind`).
    """
    target = Path(out)
    if target.exists() and not overwrite:
        raise ClipcraftError(f"{target} exists; pass --overwrite (Python: overwrite=True) to replace it.")
    kind = export_kind(model)
    hf = to_hf_model(model)
    with atomic_dir(target) as tmp:
        with _quiet_transformers():
            hf.save_pretrained(str(tmp))
            model.tokenizer.save_pretrained(str(tmp))
        processor = _processor_json(model.config.image.preprocess, kind)
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        from clipcraft.interop.card import model_card

        (tmp / "README.md").write_text(model_card(model, transformers_class=type(hf).__name__))
    return target
