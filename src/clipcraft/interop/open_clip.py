"""open_clip checkpoints in: ``open_clip:ViT-B-32`` plus a checkpoint file.

The state dict is mapped onto modules clipcraft already runs, so the imported model needs no open_clip:

- open_clip's own ViT image tower -> a transformers ``CLIPVisionModel`` (``hf_clip`` image tower): conv
  patch embedding, class token, positions, pre-LayerNorm, residual blocks (fused q/k/v split in three),
  post-LayerNorm on the class token, then ``proj`` as a bias-free linear head;
- a timm image tower (``vision_cfg.timm_model_name``) -> clipcraft's timm tower with the same pooling, and
  open_clip's linear ``head.proj`` as a bias-free linear head;
- open_clip's own text transformer -> a transformers ``CLIPTextModel`` (causal attention, pooled at the
  end-of-text token, which in CLIP's vocabulary is the highest id: open_clip's ``argmax``), then
  ``text_projection`` as a bias-free linear head;
- a transformers text tower (``text_cfg.hf_model_name``, open_clip's ``HFTextEncoder``) -> clipcraft's ``hf``
  text tower, the same AutoModel with its weights from ``text.transformer.*``: ``mean_pooler`` -> mean
  pooling, ``cls_last_hidden_state_pooler`` -> ``cls``, ``cls_pooler`` -> ``pooler`` (the model's own pooling
  layer, which open_clip builds exactly then); ``hf_proj_type`` ``linear`` -> a bias-free linear text head,
  ``mlp`` -> a ``plain_mlp`` text head (bias-free Linear -> GELU -> Linear), null (widths equal) -> none.
  The tokenizer is the model's own (``hf_tokenizer_name``, as open_clip's ``HFTokenizer``), truncated at
  ``context_length``; padding is masked, as open_clip masks the config's ``pad_token_id``;
- the CLIP BPE tokenizer: open_clip's ``bpe_simple_vocab_16e6.txt.gz`` written as a transformers
  ``CLIPTokenizerFast`` (vocabulary built exactly as open_clip's ``SimpleTokenizer`` builds it).

An open_clip checkpoint holds a transformers text tower's weights but not its architecture: its config.json
comes from ``hf_model_name``, a local directory (write it into a copy of the architecture JSON) or a hub id
transformers can read; neither raises :class:`~clipcraft.errors.PretrainedWeightsError` saying so, never
random weights. Captions are cleaned as clipcraft cleans them (stripped), not with open_clip's ftfy pass:
the ids agree for plain captions.

Reading the architecture table and the tokenizer's vocabulary file needs ``open_clip_torch`` installed at
import time (``pip install open_clip_torch``); the imported (and saved) model does not. Configurations whose
modules have no counterpart here are refused with the reason rather than imported approximately: attentional
pooling, layer scale, CoCa, non-``argmax`` pooling of open_clip's own text transformer; for transformers text
towers, encoder-decoder models (mT5, NLLB: open_clip runs their encoder half), ``max_pooler`` (broken in
open_clip: it masks the caption instead of the padding), a tokenizer whose padding id is not the config's
``pad_token_id``, ``tokenizer_mode``/``tokenizer_kwargs`` and configs without ``hf_tokenizer_name`` (open_clip
then uses its CLIP BPE tokenizer).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipcraft.config import HeadConfig, ImageTowerConfig, ModelConfig, PreprocessConfig, TextTowerConfig
from clipcraft.errors import ClipcraftError, PretrainedWeightsError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_INSTALL = "pip install open_clip_torch (or: pip install 'clipcraft[openclip]')"


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise ClipcraftError(
            f"Importing an open_clip model needs open_clip's architecture table and tokenizer: {_INSTALL}."
        ) from exc
    return open_clip


def architecture(name: str) -> dict[str, Any]:
    """open_clip's model config for ``name`` (a name open_clip knows, or a JSON file with ``model_cfg`` or the
    config itself)."""
    path = Path(name).expanduser()
    if path.is_file():
        data = json.loads(path.read_text())
        return dict(data.get("model_cfg", data))
    cfg = _open_clip().get_model_config(name)
    if cfg is None:
        from clipcraft.errors import unknown_name

        raise unknown_name("open_clip architecture", name, list(_open_clip().list_models()))
    return dict(cfg)


def read_checkpoint(path: str) -> dict[str, Tensor]:
    """An open_clip checkpoint's state dict (``.safetensors``, or a torch file holding the state dict or a
    training checkpoint with ``state_dict``; DDP ``module.`` prefixes removed)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PretrainedWeightsError(f"open_clip checkpoint file not found: {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{file} does not hold a state dict.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _check(cfg: dict[str, Any], key: str, allowed: Any, where: str) -> None:
    value = cfg.get(key, allowed if not isinstance(allowed, tuple) else allowed[0])
    ok = value in allowed if isinstance(allowed, tuple) else value == allowed
    if not ok:
        raise ClipcraftError(
            f"open_clip {where} option {key}={value!r} has no counterpart in clipcraft's towers; this "
            "configuration cannot be imported."
        )


def _vision_hf_config(v: dict[str, Any], quick_gelu: bool) -> dict[str, Any]:
    for key, allowed in (("attentional_pool", False), ("ls_init_value", None), ("no_ln_pre", False),
                         ("final_ln_after_pool", False), ("pool_type", ("tok",)), ("output_tokens", False),
                         ("attn_pooler_heads", (8,)), ("act_kwargs", None), ("norm_kwargs", None)):  # fmt: skip
        _check(v, key, allowed, "vision_cfg")
    width = int(v.get("width", 768))
    image_size = v.get("image_size", 224)
    patch = v.get("patch_size", 16)
    if isinstance(image_size, (list, tuple)) or isinstance(patch, (list, tuple)):
        raise ClipcraftError("open_clip vision configs with non-square images or patches cannot be imported.")
    return {
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": int(width * float(v.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(v.get("layers", 12)),
        "num_attention_heads": width // int(v.get("head_width", 64)),
        "image_size": int(image_size),
        "patch_size": int(patch),
        "num_channels": 3,
        "hidden_act": "quick_gelu" if quick_gelu else "gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
    }


def _text_hf_config(t: dict[str, Any], quick_gelu: bool) -> dict[str, Any]:
    for key, allowed in (("ls_init_value", None), ("pool_type", ("argmax",)), ("proj_bias", False),
                         ("no_causal_mask", False), ("embed_cls", False), ("output_tokens", False),
                         ("act_kwargs", None), ("norm_kwargs", None), ("proj_type", ("linear",))):  # fmt: skip
        _check(t, key, allowed, "text_cfg")
    width = int(t.get("width", 512))
    return {
        "model_type": "clip_text_model",
        "vocab_size": int(t.get("vocab_size", 49408)),
        "hidden_size": width,
        "intermediate_size": int(width * float(t.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(t.get("layers", 12)),
        "num_attention_heads": int(t.get("heads", 8)),
        "max_position_embeddings": int(t.get("context_length", 77)),
        "hidden_act": "quick_gelu" if quick_gelu else "gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        # eos_token_id 2 selects transformers' argmax pooling: the end-of-text token has CLIP's highest id,
        # which is exactly open_clip's text_pool_type="argmax"
        "eos_token_id": 2,
        "bos_token_id": 49406,
        "pad_token_id": 1,
    }


# open_clip's poolers after a transformers text tower -> clipcraft's text tower pooling. open_clip builds the
# model's own pooling layer exactly when it asks for cls_pooler, and then returns that layer's output.
HF_POOLERS = {
    "mean_pooler": "mean",  # masked mean over the caption's tokens
    "cls_last_hidden_state_pooler": "cls",  # the first token's last hidden state
    "cls_pooler": "pooler",  # the model's pooling layer over the first token (BERT, RoBERTa: dense + tanh)
}
# open_clip's projections after a transformers text tower -> clipcraft's text head kind
HF_PROJECTIONS = {
    "linear": "linear",  # bias-free linear
    "mlp": "plain_mlp",  # bias-free Linear -> GELU -> Linear through (width + embed_dim) // 2
}


def hf_text_config(name: str) -> dict[str, Any]:
    """The transformers config of open_clip's ``text_cfg.hf_model_name``: a local directory, or a hub id
    transformers can read (from its cache when offline). Raises
    :class:`~clipcraft.errors.PretrainedWeightsError` when neither works: the checkpoint holds the tower's
    weights but not its architecture."""
    from transformers import AutoConfig

    from clipcraft.towers import _quiet_transformers, resolve_text_source

    try:
        with _quiet_transformers():
            return dict(AutoConfig.from_pretrained(resolve_text_source(name)).to_dict())
    except (OSError, ValueError) as exc:
        raise PretrainedWeightsError(
            f"open_clip text_cfg.hf_model_name={name!r}: an open_clip checkpoint holds this transformers text "
            "tower's weights but not its architecture (layer sizes, vocabulary, positions: the model's "
            f"config.json), and that could not be read: {exc}\nDownload the model's config.json and tokenizer "
            "files into a directory, name it as hf_model_name and hf_tokenizer_name in a copy of the "
            "architecture JSON, and import open_clip:/path/arch.json,checkpoint=FILE."
        ) from exc


def _local(name: str) -> str:
    """A local directory as an absolute path (a saved model must not depend on the working directory)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _hf_text_tower(t: dict[str, Any], embed_dim: int) -> tuple[TextTowerConfig, str]:
    """open_clip's ``HFTextEncoder`` -> clipcraft's transformers text tower, and the text head kind."""
    for key, allowed in (
        ("output_tokens", False),
        ("tokenizer_mode", None),
        ("tokenizer_kwargs", (None, {})),
    ):
        _check(t, key, allowed, "text_cfg")
    name = str(t["hf_model_name"])
    if not t.get("hf_tokenizer_name"):
        raise ClipcraftError(
            f"open_clip text_cfg has hf_model_name={name!r} but no hf_tokenizer_name: open_clip then tokenizes "
            "with its CLIP BPE tokenizer, padded with id 0, which clipcraft does not pair with a transformers "
            "text tower. Add hf_tokenizer_name (usually the same as hf_model_name) to the architecture JSON."
        )
    hf = hf_text_config(name)
    model_type = hf.get("model_type")
    if hf.get("is_encoder_decoder"):
        raise ClipcraftError(
            f"open_clip text tower {name!r} is the encoder half of a {model_type!r} encoder-decoder (mT5, NLLB); "
            "clipcraft's transformers text tower runs whole encoder models, so this configuration cannot be "
            "imported."
        )
    pooler = t.get("hf_pooler_type", "mean_pooler")  # open_clip's CLIPTextCfg default
    if pooler is None:  # open_clip then takes the architecture's default pooler
        _open_clip()
        from open_clip.hf_configs import arch_dict

        pooler = arch_dict.get(str(model_type), {}).get("pooler")
    if pooler == "max_pooler":
        raise ClipcraftError(
            "open_clip's max_pooler cannot be imported: it fills the caption's own tokens (not the padding) "
            "and open_clip itself fails on it (masked_fill with an integer mask); no model computes with it."
        )
    if pooler not in HF_POOLERS:
        raise ClipcraftError(
            f"open_clip text_cfg.hf_pooler_type={pooler!r} has no counterpart in clipcraft's text tower "
            f"(importable: {', '.join(HF_POOLERS)})."
        )
    if "hidden_size" not in hf:  # open_clip reads the width of the encoder-only types it knows there
        raise ClipcraftError(
            f"open_clip text tower {name!r}: a {model_type!r} config has no hidden_size, so open_clip cannot "
            "have built this tower (it knows roberta, xlm-roberta and bert encoders)."
        )
    width = int(hf["hidden_size"])
    proj = t.get("hf_proj_type", "mlp")  # open_clip's CLIPTextCfg default
    if proj is None and width == embed_dim:
        head = "none"  # open_clip passes the pooled features through
    elif proj in HF_PROJECTIONS:
        head = HF_PROJECTIONS[proj]
    else:
        raise ClipcraftError(
            f"open_clip text_cfg.hf_proj_type={proj!r} (text width {width}, embed_dim {embed_dim}) builds no "
            f"projection open_clip can run; importable: {', '.join(HF_PROJECTIONS)}, or null when the widths "
            "are equal."
        )
    text = TextTowerConfig(
        kind="hf",
        name=_local(name),
        hf_config=hf,
        tokenizer=_local(str(t["hf_tokenizer_name"])),
        pooling=HF_POOLERS[pooler],
        max_length=int(t.get("context_length", 77)),
        normalize_features=False,
        lowercase=False,  # open_clip's HFTokenizer cleans whitespace only
    )
    return text, head


def check_hf_padding(tokenizer: Any, text: TextTowerConfig) -> None:
    """open_clip masks the positions that hold the model config's ``pad_token_id``; clipcraft masks the
    tokenizer's padding. The two agree only when the tokenizer pads with that id: refuse otherwise."""
    pad = (text.hf_config or {}).get("pad_token_id")
    if pad is None or tokenizer.pad_token_id != pad:
        raise ClipcraftError(
            f"open_clip text tower {text.name!r}: its tokenizer pads with id {tokenizer.pad_token_id} but the "
            f"model config's pad_token_id is {pad}; open_clip masks by the config's id, so its attention mask "
            "would not be the tokenizer's and no faithful import is possible."
        )


def _timm_tower(v: dict[str, Any]) -> tuple[ImageTowerConfig, str]:
    pool = v.get("timm_pool", "avg")
    proj = v.get("timm_proj", "linear")
    if pool in ("abs_attn", "rot_attn") or proj not in ("linear", "none"):
        raise ClipcraftError(
            f"open_clip timm tower with pool={pool!r}, proj={proj!r} cannot be imported (linear or no projection "
            "after timm's own pooling only)."
        )
    if v.get("timm_proj_bias", False):
        raise ClipcraftError(
            "open_clip timm towers with a projection bias cannot be imported (bias-free heads)."
        )
    import timm

    name = v["timm_model_name"]
    kwargs: dict[str, Any] = {}
    if pool:
        kwargs["global_pool"] = pool
        entry = timm.models.model_entrypoint(timm.models.get_arch_name(name))
        if entry.__module__.endswith("vision_transformer"):
            kwargs["fc_norm"] = False  # open_clip resets the classifier after creation: the final norm stays
    return ImageTowerConfig(kind="timm", name=name, model_kwargs=kwargs), proj


def _preprocess(cfg: dict[str, Any], image_size: int) -> PreprocessConfig:
    pre = dict(cfg.get("preprocess_cfg", {}))
    mode = pre.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ClipcraftError(f"open_clip resize_mode {mode!r} cannot be reproduced by clipcraft's transform.")
    return PreprocessConfig(
        input_size=(3, image_size, image_size),
        mean=tuple(pre.get("mean", OPENAI_MEAN)),  # type: ignore[arg-type]
        std=tuple(pre.get("std", OPENAI_STD)),  # type: ignore[arg-type]
        interpolation=pre.get("interpolation", "bicubic"),
        crop_pct=1.0,
        crop_mode="center" if mode == "shortest" else "squash",
    )


def model_config(cfg: dict[str, Any], name: str, checkpoint: str | None) -> tuple[ModelConfig, str]:
    """The clipcraft config of an open_clip architecture, and the image projection kind (linear | none)."""
    if "multimodal_cfg" in cfg:
        raise ClipcraftError(
            "open_clip CoCa models (multimodal_cfg) are not dual encoders clipcraft imports."
        )
    v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    quick_gelu = bool(cfg.get("quick_gelu", False))
    image_size = v.get("image_size", 224)
    if "timm_model_name" in v:
        image, proj = _timm_tower(v)
    else:
        image = ImageTowerConfig(
            kind="hf_clip", name=f"open_clip:{name}", hf_config=_vision_hf_config(v, quick_gelu)
        )
        proj = "linear"
    if proj != "linear":
        raise ClipcraftError("open_clip towers without a projection cannot share clipcraft's linear heads.")
    image.preprocess = _preprocess(
        cfg, int(image_size if not isinstance(image_size, (list, tuple)) else image_size[0])
    )
    embed_dim = int(cfg["embed_dim"])
    if t.get("hf_model_name"):  # the condition on which open_clip builds an HFTextEncoder
        text, text_head = _hf_text_tower(t, embed_dim)
    else:
        text = TextTowerConfig(
            kind="hf_clip",
            name=f"open_clip:{name}",
            hf_config=_text_hf_config(t, quick_gelu),
            max_length=int(t.get("context_length", 77)),
            normalize_features=False,
            lowercase=False,
        )
        text_head = "linear"
    init_bias = cfg.get("init_logit_bias")
    config = ModelConfig(
        image=image,
        text=text,
        head=HeadConfig(kind="linear", dropout=0.0, text_kind=None if text_head == "linear" else text_head),
        embed_dim=embed_dim,
        init_logit_scale=math.log(1 / 0.07),
        init_logit_bias=float(init_bias) if init_bias is not None else -10.0,
        source={"format": "open_clip", "name": name, "checkpoint": checkpoint},
    )
    return config, proj


def _blocks(state: dict[str, Tensor], src: str, dst: str, out: dict[str, Tensor]) -> None:
    """open_clip residual blocks under ``src`` -> transformers CLIP encoder layers under ``dst``."""
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}  # fmt: skip
    for key, value in state.items():
        if not key.startswith(src):
            continue
        index, rest = key[len(src) :].split(".", 1)
        base = f"{dst}{index}."
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[-1]  # weight | bias
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{base}self_attn.{part}.{kind}"] = chunk.clone()
            continue
        for old, new in names.items():
            if rest.startswith(old + "."):
                out[base + new + rest[len(old) :]] = value
                break
        else:
            raise ClipcraftError(f"open_clip weight {key!r} has no counterpart in a transformers CLIP layer.")


# open_clip's projection after a transformers text tower -> clipcraft's text head, by head kind
_HF_PROJ_KEYS = {
    "linear": {"text.proj.weight": "text_head.proj.weight"},
    "plain_mlp": {"text.proj.0.weight": "text_head.fc1.weight", "text.proj.2.weight": "text_head.fc2.weight"},
    "none": {},
}


def _hf_text_state(state: dict[str, Tensor], head: str, out: dict[str, Tensor]) -> None:
    """open_clip's ``text.transformer.*`` (a transformers model) and ``text.proj`` -> clipcraft's text tower
    and head."""
    proj = _HF_PROJ_KEYS[head]
    for key, value in state.items():
        if key.startswith("text.transformer."):
            rest = key[len("text.transformer.") :]
            if not rest.endswith("position_ids"):  # an arange buffer older transformers saved
                out["text_tower.model." + rest] = value
        elif key in proj:
            out[proj[key]] = value
        elif key.startswith("text."):
            raise ClipcraftError(
                f"open_clip weight {key!r} has no counterpart in a {head} text head; this checkpoint does not "
                "match its architecture's hf_proj_type."
            )


def map_state(state: dict[str, Tensor], config: ModelConfig, model: Any) -> dict[str, Tensor]:
    """An open_clip CLIP state dict renamed onto clipcraft's ``model`` (built from ``config``)."""
    out: dict[str, Tensor] = {}
    hf_text = config.text.kind == "hf"
    text_prefixes = ["text."] if hf_text else ["token_embedding.", "positional_embedding", "transformer.",
                                               "ln_final.", "text_projection", "attn_mask"]  # fmt: skip
    used_prefixes = ["visual.", "logit_scale", "logit_bias", *text_prefixes]
    unknown = [k for k in state if not k.startswith(tuple(used_prefixes))]
    if unknown:
        raise ClipcraftError(f"open_clip checkpoint has weights clipcraft cannot place: {unknown[:8]}")
    if config.image.kind == "timm":
        for key, value in state.items():
            if key.startswith("visual.trunk."):
                out["image_tower.trunk." + key[len("visual.trunk.") :]] = value
        out["image_head.proj.weight"] = state["visual.head.proj.weight"]
    else:
        v = "image_tower.trunk."
        out[v + "embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
        out[v + "embeddings.class_embedding"] = state["visual.class_embedding"]
        out[v + "embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
        for ln, hf in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
            out[f"{v}{hf}.weight"] = state[f"visual.{ln}.weight"]
            out[f"{v}{hf}.bias"] = state[f"visual.{ln}.bias"]
        _blocks(state, "visual.transformer.resblocks.", v + "encoder.layers.", out)
        out["image_head.proj.weight"] = state["visual.proj"].T.contiguous()  # (width, D) -> (D, width)
    if hf_text:
        _hf_text_state(state, config.head.kind_of("text"), out)
    else:
        t = "text_tower.model."
        out[t + "embeddings.token_embedding.weight"] = state["token_embedding.weight"]
        out[t + "embeddings.position_embedding.weight"] = state["positional_embedding"]
        out[t + "final_layer_norm.weight"] = state["ln_final.weight"]
        out[t + "final_layer_norm.bias"] = state["ln_final.bias"]
        _blocks(state, "transformer.resblocks.", t + "encoder.layers.", out)
        out["text_head.proj.weight"] = state["text_projection"].T.contiguous()
    out["logit_scale"] = state["logit_scale"].reshape(())
    bias = state.get("logit_bias")
    out["logit_bias"] = bias.reshape(()) if bias is not None else model.logit_bias.detach().clone()
    expected = model.state_dict()
    for key in expected:  # buffers the open_clip model does not store (position ids)
        if key not in out and key.endswith("position_ids"):
            out[key] = expected[key]
    return out


def clip_tokenizer(context_length: int) -> Any:
    """open_clip's CLIP BPE tokenizer as a transformers ``CLIPTokenizerFast`` (lowercased, ftfy-free basic
    cleaning as transformers does it; ids equal open_clip's ``tokenize`` for plain captions)."""
    import gzip

    from transformers import CLIPTokenizer, CLIPTokenizerFast

    open_clip = _open_clip()
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as fh:
        merges = fh.read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]  # the same slice as open_clip's SimpleTokenizer
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    del open_clip
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
        # open_clip pads with id 0 ("!"), after the end-of-text token
        slow = CLIPTokenizer(
            str(vocab_file), str(merges_file), model_max_length=context_length, pad_token="!"
        )
        slow.save_pretrained(tmp + "/slow")
        return CLIPTokenizerFast.from_pretrained(tmp + "/slow", model_max_length=context_length)


def import_open_clip(name: str, checkpoint: str | None = None) -> Any:
    """A ClipModel from open_clip architecture ``name`` and its ``checkpoint`` file.

    Raises :class:`~clipcraft.errors.PretrainedWeightsError` without a readable checkpoint (open_clip's
    download tags are not fetched here: download the file and pass its path) and
    :class:`~clipcraft.errors.ClipcraftError` for architectures that do not map (see the module doc).
    """
    from clipcraft.model import ClipModel, load_checked
    from clipcraft.towers import load_tokenizer

    if not checkpoint:
        raise PretrainedWeightsError(
            f"open_clip:{name} needs its weights file: open_clip:{name},checkpoint=/path/open_clip_model.bin "
            "(Python: create_model('open_clip:NAME', checkpoint=PATH)). Tags that download are not fetched."
        )
    cfg = architecture(name)
    state = read_checkpoint(checkpoint)
    config, _ = model_config(cfg, name, str(checkpoint))
    if config.text.kind == "hf":  # the transformers model's own tokenizer, as open_clip's HFTokenizer
        tokenizer = load_tokenizer(str(config.text.tokenizer), config.text.name)
        check_hf_padding(tokenizer, config.text)
    else:
        tokenizer = clip_tokenizer(config.text.max_length or 77)
    model = ClipModel(config)
    load_checked(model, map_state(state, config, model), f"{checkpoint} (open_clip {name})")
    model.text_tower.tokenizer = tokenizer
    return model
