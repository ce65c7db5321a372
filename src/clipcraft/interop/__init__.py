"""Interop: existing dual encoders in, transformers directories out.

One module per foreign format, each with its parity test against the foreign library:

- :mod:`clipcraft.interop.hf`: transformers ``CLIPModel`` / ``SiglipModel`` directories or hub ids in;
  ``CLIPModel`` / ``SiglipModel`` / ``VisionTextDualEncoderModel`` directories out.
- :mod:`clipcraft.interop.open_clip`: open_clip checkpoints (``open_clip:ViT-B-32`` plus a checkpoint file),
  mapped onto transformers CLIP modules (open_clip's own ViT and text transformer), timm (its timm towers)
  and clipcraft's transformers text tower (its HF text towers).
- :mod:`clipcraft.interop.card`: the Hugging Face model card ``model.save`` writes.

:func:`import_model` is what :func:`clipcraft.create_model`, :func:`clipcraft.load` and ``--model`` call for a
source that is not a clipcraft directory or preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HF_PREFIX = "hf:"
OPEN_CLIP_PREFIX = "open_clip:"


def is_foreign_source(source: str) -> bool:
    """True for ``hf:...``, ``open_clip:...`` and a directory holding a transformers CLIP/SigLIP config."""
    if source.startswith((HF_PREFIX, OPEN_CLIP_PREFIX)):
        return True
    from clipcraft.interop.hf import is_hf_dual_encoder_dir

    return is_hf_dual_encoder_dir(source)


def parse_source(source: str) -> tuple[str, str, dict[str, str]]:
    """``"open_clip:ViT-B-32,checkpoint=/w.bin"`` -> ``("open_clip", "ViT-B-32", {"checkpoint": "/w.bin"})``.

    ``hf:ID_OR_DIR`` -> ``("hf", ID_OR_DIR, {})``; a bare directory is ``hf``. Options follow the name after
    commas as ``key=value``.
    """
    kind = "hf"
    rest = source
    for prefix in (HF_PREFIX, OPEN_CLIP_PREFIX):
        if source.startswith(prefix):
            kind, rest = prefix[:-1], source[len(prefix) :]
    name, *opts = rest.split(",")
    options: dict[str, str] = {}
    for opt in opts:
        if "=" not in opt:
            from clipcraft.errors import ClipcraftError

            raise ClipcraftError(f"Model source option {opt!r} in {source!r} is not key=value.")
        key, value = opt.split("=", 1)
        options[key.strip()] = value.strip()
    return kind, name, options


def import_model(source: str, device: Any = "cpu", **options: Any) -> Any:
    """A :class:`~clipcraft.model.ClipModel` from a foreign source (see :func:`parse_source`), in eval mode.

    ``options`` (e.g. ``checkpoint=``) add to those written in ``source``. Weights that cannot be read raise
    :class:`~clipcraft.errors.PretrainedWeightsError`: never random weights.
    """
    kind, name, opts = parse_source(source)
    opts.update({k: str(v) for k, v in options.items() if v is not None})
    if kind == "open_clip":
        from clipcraft.interop.open_clip import import_open_clip

        model = import_open_clip(name, checkpoint=opts.pop("checkpoint", None), **opts)
    else:
        from clipcraft.interop.hf import import_hf

        if opts:
            from clipcraft.errors import ClipcraftError

            raise ClipcraftError(f"hf sources take no options; got {sorted(opts)}.")
        model = import_hf(str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name)
    # the imported temperature (SigLIP's is above CLIP's clamp of 100) is the start, and training may keep it
    scale = float(model.logit_scale.detach())
    model.config.init_logit_scale = scale
    model.config.max_logit_scale = max(model.config.max_logit_scale, scale)
    model.config.init_logit_bias = float(model.logit_bias.detach())
    return model.to(device).eval()
