"""ONNX export: a model's two towers + heads as two standalone ONNX graphs, with what it takes to feed them.

``export_onnx(model, out)`` writes a directory that needs neither clipcraft nor torch to use:

- ``image.onnx``: ``pixel_values`` (batch, 3, H, W) float32 -> ``image_embeddings`` (batch, D) float32.
- ``text.onnx``: ``input_ids`` and ``attention_mask`` (batch, sequence) int64 -> ``text_embeddings``
  (batch, D) float32.
- ``preprocess.json``: the image preprocessing (size, mean, std, resize, crop), the tokenizer settings, the
  graphs' input and output names and shapes, and the embedding contract.
- ``tokenizer/``: the model's tokenizer files; ``tokenizer/tokenizer.json`` has clipcraft's whitespace strip,
  lowercasing, truncation and padding built in, so ``tokenizers.Tokenizer.from_file`` reproduces
  :meth:`~clipcraft.model.ClipModel.tokenize`.
- ``README.txt``: the same contract in words, with a usage example.

Both graphs output embeddings (head applied, L2-normalised), so the cosine similarity of an image and a caption
is the dot product of their rows. Batch and sequence length are dynamic.

Graphs are produced by the ``torch.export``-based ONNX exporter. It refuses what it cannot capture as one graph
(Python control flow on tensor values, unsupported operators) where the older TorchScript tracer would silently
bake one input's path into the graph. Both towers are captured and converted in memory before anything is
written, so a tower that cannot be exported fails with a :class:`~clipcraft.errors.ClipcraftError` and an
untouched output directory.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcraft.errors import ClipcraftError
from clipcraft.flags import print_help_and_fail
from clipcraft.version import __version__

if TYPE_CHECKING:
    from torch import Tensor, nn

    from clipcraft.model import ClipModel

EXPORT_FORMAT = "clipcraft-onnx"
EXPORT_FORMAT_VERSION = 1
IMAGE_GRAPH = "image.onnx"
TEXT_GRAPH = "text.onnx"
PREPROCESS_FILE = "preprocess.json"
README_FILE = "README.txt"
TOKENIZER_DIR = "tokenizer"

# The graphs' input and output names (the ONNX contract; changing one breaks users' code).
PIXEL_VALUES = "pixel_values"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
IMAGE_EMBEDDINGS = "image_embeddings"
TEXT_EMBEDDINGS = "text_embeddings"

# An exported graph must agree with clipcraft's own embeddings at least this well (cosine, every row).
MIN_COSINE = 0.9999

# Captions for tracing and checking the text graph: different lengths, so padding and the mask are exercised.
_EXAMPLE_CAPTIONS = ("a photo of a dog running on the beach", "two cats", "a red car parked outside a shop")


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote.

    out_dir: the export directory. files: its files, relative to ``out_dir``, sorted.
    embed_dim: D, the width of both graphs' outputs.
    image_cosine / text_cosine: the lowest cosine between an ONNX Runtime embedding and clipcraft's own over
        the check inputs (batch sizes 1 and 3; two sequence lengths), or None when not verified.
    seconds: wall time of the whole export; timings: seconds per step (trace, convert, save, verify).
    """

    out_dir: Path
    files: list[str]
    embed_dim: int
    seconds: float
    image_cosine: float | None = None
    text_cosine: float | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"Exported ONNX graphs ({self.embed_dim}-d embeddings) to {self.out_dir} in {self.seconds:.1f} s:"
        ]
        lines += [f"  {name}" for name in self.files if "/" not in name]
        tokenizer_files = [name for name in self.files if name.startswith(TOKENIZER_DIR + "/")]
        if tokenizer_files:
            lines.append(f"  {TOKENIZER_DIR}/ ({len(tokenizer_files)} files)")
        if self.image_cosine is not None and self.text_cosine is not None:
            lines.append(
                f"Checked with ONNX Runtime against clipcraft: lowest cosine {self.image_cosine:.6f} (images), "
                f"{self.text_cosine:.6f} (captions)."
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The two graphs


def _graph_modules(model: ClipModel) -> tuple[nn.Module, nn.Module]:
    """The modules exported: tower + head + L2 normalisation, one per modality."""
    from torch import nn

    class ImageGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: Tensor) -> Tensor:
            features = self.model.image_tower(pixel_values)  # (B, F_img)
            return self.model.embed_image_features(features)  # (B, D), unit norm

    class TextGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
            features = self.model.text_tower(input_ids, attention_mask)  # (B, F_txt)
            return self.model.embed_text_features(features)  # (B, D), unit norm

    return ImageGraph().eval(), TextGraph().eval()


def _example_pixels(model: ClipModel, batch: int, seed: int = 0) -> Tensor:
    import torch

    _, height, width = model.config.image.preprocess.input_size  # type: ignore[union-attr]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)  # (B, 3, H, W)


def _example_tokens(model: ClipModel, captions: tuple[str, ...]) -> dict[str, Tensor]:
    return {k: v.long() for k, v in model.tokenize(list(captions)).items()}  # (B, L) each


def _short_reason(exc: BaseException) -> str:
    """The root cause of an exporter error in one line, plus the user-code location it names, if any."""
    import re

    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)  # the exporter wraps the real cause in generic errors
    root = chain[-1]
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(root)).strip() or type(root).__name__
    reason = f"{type(root).__name__}: {text.splitlines()[0][:300]}"
    marker = "The following call raised this error:"
    for link in chain:
        message = str(link)
        if marker in message:
            where = [ln.strip() for ln in message.split(marker, 1)[1].strip().splitlines()[:2] if ln.strip()]
            reason += f" (at {' '.join(where)})" if where else ""
            break
    return reason


@dataclass
class _GraphSpec:
    """One graph to export: the module, example inputs, dynamic axes and the ONNX input/output names."""

    what: str  # for messages, e.g. "image tower (vit_tiny_patch16_224)"
    module: nn.Module
    args: tuple[Tensor, ...]
    dims: dict[str, dict[int, Any]]  # torch.export Dims per input
    inputs: list[str]
    outputs: list[str]
    axes: str  # the dynamic axes, for messages


def _graph_specs(model: ClipModel) -> dict[str, _GraphSpec]:
    from torch.export import Dim

    image_graph, text_graph = _graph_modules(model)
    batch = Dim("batch", min=1)
    sequence = Dim("sequence", min=1, max=int(model.config.text.max_length or 512))
    tokens = _example_tokens(model, _EXAMPLE_CAPTIONS[:2])
    return {
        "image": _GraphSpec(
            what=f"image tower ({model.config.image.name})",
            module=image_graph,
            args=(_example_pixels(model, batch=2),),
            dims={PIXEL_VALUES: {0: batch}},
            inputs=[PIXEL_VALUES],
            outputs=[IMAGE_EMBEDDINGS],
            axes="a dynamic batch",
        ),
        "text": _GraphSpec(
            what=f"text tower ({model.config.text.name})",
            module=text_graph,
            args=(tokens[INPUT_IDS], tokens[ATTENTION_MASK]),
            dims={INPUT_IDS: {0: batch, 1: sequence}, ATTENTION_MASK: {0: batch, 1: sequence}},
            inputs=[INPUT_IDS, ATTENTION_MASK],
            outputs=[TEXT_EMBEDDINGS],
            axes="a dynamic batch and sequence length",
        ),
    }


def _capture(model: ClipModel) -> tuple[dict[str, Any], dict[str, float]]:
    """Trace both graphs, then convert both to ONNX, all in memory; raise naming the tower that fails.

    Returns ``({"image": ONNXProgram, "text": ONNXProgram}, seconds per step)``. Writes nothing.
    """
    import torch

    specs = _graph_specs(model)
    timings: dict[str, float] = {}
    # The exporter raises many unrelated exception types (user errors, unsupported operators, guards on
    # data-dependent values); to the user they all mean "this tower cannot be exported", so each is reported
    # with its root cause.
    traced = {}
    for key, spec in specs.items():
        start = time.perf_counter()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced[key] = torch.export.export(
                    spec.module, spec.args, dynamic_shapes=spec.dims, strict=False
                )
        except Exception as exc:
            raise ClipcraftError(
                f"The {spec.what} cannot be traced for ONNX export: {_short_reason(exc)}. Export needs a "
                f"forward without Python control flow on tensor values, with {spec.axes}. Nothing was written."
            ) from exc
        timings[f"trace_{key}"] = time.perf_counter() - start
    programs = {}
    for key, spec in specs.items():
        start = time.perf_counter()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                programs[key] = torch.onnx.export(
                    traced[key],
                    spec.args,
                    dynamo=True,
                    # only names the axes ("batch", "sequence"): the shapes come from the traced program
                    dynamic_shapes={
                        name: {i: d.__name__ for i, d in axes.items()} for name, axes in spec.dims.items()
                    },
                    input_names=spec.inputs,
                    output_names=spec.outputs,
                    verbose=False,
                    report=False,
                )
        except Exception as exc:
            raise ClipcraftError(
                f"The {spec.what} traced but could not be converted to ONNX: {_short_reason(exc)}. "
                "Nothing was written."
            ) from exc
        timings[f"convert_{key}"] = time.perf_counter() - start
    return programs, timings


# ----------------------------------------------------------------------------------------------------------
# Preprocessing and tokenizer files


def _image_preprocess(model: ClipModel) -> dict[str, Any]:
    p = model.config.image.preprocess
    assert p is not None  # resolved when the image tower is built
    _, height, width = (int(x) for x in p.input_size)
    info: dict[str, Any] = {
        "input_size": [3, height, width],
        "mean": [float(x) for x in p.mean],
        "std": [float(x) for x in p.std],
        "interpolation": p.interpolation,
        "crop_pct": float(p.crop_pct),
        "crop_mode": p.crop_mode,
    }
    resize = [math.floor(height / p.crop_pct), math.floor(width / p.crop_pct)]
    first = "Convert to 8-bit RGB (alpha composited on white) with the EXIF orientation applied."
    last = [
        "Scale to float32 in [0, 1] (divide by 255) and lay out as (3, H, W).",
        "Normalise each channel: (x - mean) / std.",
        f"Stack into ({PIXEL_VALUES}: batch, 3, {height}, {width}).",
    ]
    if p.crop_mode == "center" and height == width:
        info["resize_shorter_side"] = resize[0]
        steps = [
            f"Resize so the shorter side is {resize[0]} px (= floor({height} / crop_pct)), keeping the aspect "
            f"ratio (longer side = int({resize[0]} * long / short)), with PIL {p.interpolation} resampling.",
            f"Centre crop to {height}x{width}: top = round((h - {height}) / 2), left = round((w - {width}) / 2) "
            "(Python's round: halves go to the even integer).",
        ]
    elif p.crop_mode == "squash":
        info["resize_to"] = resize
        steps = [
            f"Resize to {resize[0]}x{resize[1]} (height x width), ignoring the aspect ratio, with PIL "
            f"{p.interpolation} resampling.",
            f"Centre crop to {height}x{width}.",
        ]
    else:
        steps = [
            f"timm.data.create_transform(input_size=({3}, {height}, {width}), is_training=False, "
            f"interpolation={p.interpolation!r}, mean, std, crop_pct={p.crop_pct}, crop_mode={p.crop_mode!r}) "
            "without its final tensor conversion; then the steps below."
        ]
    info["steps"] = [first, *steps, *last]
    return info


def _write_tokenizer(model: ClipModel, target: Path) -> dict[str, Any]:
    """Save the tokenizer to ``target`` with clipcraft's text handling built into ``tokenizer.json``."""
    tokenizer = model.tokenizer
    config = model.config.text
    max_length = int(config.max_length or 512)
    tokenizer.save_pretrained(str(target))
    info: dict[str, Any] = {
        "files": f"{TOKENIZER_DIR}/",
        "strip": True,
        "lowercase": bool(config.lowercase),
        "max_length": max_length,
        "truncation": "right, to max_length tokens including special tokens",
        "padding": "right, to the longest caption in the batch",
        "pad_token": tokenizer.pad_token,
        "pad_token_id": int(tokenizer.pad_token_id),
        "pooling": config.pooling,
    }
    json_file = target / "tokenizer.json"
    if json_file.is_file():
        from tokenizers import Tokenizer, normalizers

        backend = Tokenizer.from_file(str(json_file))
        steps: list[Any] = [normalizers.Strip()]
        if config.lowercase:
            steps.append(normalizers.Lowercase())
        if backend.normalizer is not None:
            steps.append(backend.normalizer)
        backend.normalizer = normalizers.Sequence(steps)
        backend.enable_truncation(max_length=max_length)
        backend.enable_padding(pad_id=int(tokenizer.pad_token_id), pad_token=str(tokenizer.pad_token))
        backend.save(str(json_file))
        info["tokenizer_json"] = f"{TOKENIZER_DIR}/tokenizer.json"
        info["note"] = (
            "tokenizer.json has the strip, lowercasing, truncation and padding built in: "
            "tokenizers.Tokenizer.from_file(...).encode_batch(captions) gives the graph's input_ids and "
            "attention_mask directly."
        )
    else:
        info["note"] = "Strip each caption, lowercase it if 'lowercase', then tokenize with the files here."
    return info


def _graph_io(model: ClipModel) -> dict[str, Any]:
    _, height, width = (int(x) for x in model.config.image.preprocess.input_size)  # type: ignore[union-attr]
    dim = model.embed_dim

    def tensor(name: str, shape: list[int | str], dtype: str) -> dict[str, Any]:
        return {"name": name, "shape": shape, "dtype": dtype}

    return {
        "image": {
            "file": IMAGE_GRAPH,
            "inputs": [tensor(PIXEL_VALUES, ["batch", 3, height, width], "float32")],
            "outputs": [tensor(IMAGE_EMBEDDINGS, ["batch", dim], "float32")],
        },
        "text": {
            "file": TEXT_GRAPH,
            "inputs": [
                tensor(INPUT_IDS, ["batch", "sequence"], "int64"),
                tensor(ATTENTION_MASK, ["batch", "sequence"], "int64"),
            ],
            "outputs": [tensor(TEXT_EMBEDDINGS, ["batch", dim], "float32")],
        },
    }


def _readme(meta: dict[str, Any]) -> str:
    image, text, graphs = meta["image"], meta["text"], meta["graphs"]

    def signature(graph: dict[str, Any]) -> str:
        def one(t: dict[str, Any]) -> str:
            return f"{t['name']} {t['dtype']} ({', '.join(str(s) for s in t['shape'])})"

        ins = ", ".join(one(t) for t in graph["inputs"])
        outs = ", ".join(one(t) for t in graph["outputs"])
        return f"{graph['file']}: {ins} -> {outs}"

    steps = "\n".join(f"  {i}. {s}" for i, s in enumerate(image["steps"], start=1))
    return f"""ONNX export of a clipcraft model (clipcraft {meta["clipcraft_version"]}).

Graphs (batch and sequence are dynamic; sequence <= {text["max_length"]}):
  {signature(graphs["image"])}
  {signature(graphs["text"])}

Outputs are embeddings: the projection head is applied and every row is L2-normalised, so the cosine
similarity of an image and a caption is the dot product of their rows. Zero-shot logits:
{meta["logit_scale"]:.4f} * image_embeddings @ text_embeddings.T.

Images -> {PIXEL_VALUES} (also in {PREPROCESS_FILE} under "image"):
{steps}

Captions -> {INPUT_IDS}, {ATTENTION_MASK}: {text["note"]}
  Settings: strip whitespace, lowercase={text["lowercase"]}, max_length={text["max_length"]},
  pad_token_id={text["pad_token_id"]}; feed both arrays as int64.

Example (Python, needs onnxruntime, tokenizers, pillow, numpy):
  import numpy as np, onnxruntime as ort
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file("{TOKENIZER_DIR}/tokenizer.json")
  enc = tok.encode_batch(["a dog on the grass", "a red car"])
  ids = np.array([e.ids for e in enc], dtype=np.int64)
  mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
  text = ort.InferenceSession("{TEXT_GRAPH}").run(None, {{"{INPUT_IDS}": ids, "{ATTENTION_MASK}": mask}})[0]
  image = ort.InferenceSession("{IMAGE_GRAPH}").run(None, {{"{PIXEL_VALUES}": pixels}})[0]
  similarity = image @ text.T
"""


# ----------------------------------------------------------------------------------------------------------
# Checking the written graphs


def _verify(model: ClipModel, root: Path) -> tuple[float, float]:
    """Run the written graphs with ONNX Runtime at two batch sizes (and two caption lengths) and return the
    lowest cosine against clipcraft's own embeddings, per modality. Raises when one is below MIN_COSINE."""
    import numpy as np
    import onnxruntime as ort
    import torch

    image_graph, text_graph = _graph_modules(model)
    image_session = ort.InferenceSession(str(root / IMAGE_GRAPH), providers=["CPUExecutionProvider"])
    text_session = ort.InferenceSession(str(root / TEXT_GRAPH), providers=["CPUExecutionProvider"])

    def lowest(ours: np.ndarray, theirs: np.ndarray) -> float:
        ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
        theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
        return float((ours * theirs).sum(axis=1).min())

    image_cos, text_cos = 1.0, 1.0
    with torch.no_grad():
        for batch in (1, 3):
            pixels = _example_pixels(model, batch, seed=batch)
            expected = image_graph(pixels).float().numpy()
            got = image_session.run(None, {PIXEL_VALUES: pixels.numpy()})[0]
            image_cos = min(image_cos, lowest(expected, got))
        for captions in (_EXAMPLE_CAPTIONS[1:2], _EXAMPLE_CAPTIONS):
            tokens = _example_tokens(model, captions)
            expected = text_graph(tokens[INPUT_IDS], tokens[ATTENTION_MASK]).float().numpy()
            got = text_session.run(None, {k: v.numpy() for k, v in tokens.items()})[0]
            text_cos = min(text_cos, lowest(expected, got))
    if min(image_cos, text_cos) < MIN_COSINE:
        raise ClipcraftError(
            f"The exported graphs disagree with clipcraft (lowest cosine: images {image_cos:.6f}, captions "
            f"{text_cos:.6f}; needed {MIN_COSINE}). Nothing was written; please report this with the model's "
            "config.json."
        )
    return image_cos, text_cos


# ----------------------------------------------------------------------------------------------------------
# The export


def _require_packages(verify: bool) -> None:
    needed = ["onnx", "onnxscript"] + (["onnxruntime"] if verify else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ClipcraftError(
            f"ONNX export needs {', '.join(missing)}: run `pip install 'clipcraft[export]'`."
        )


def _is_export_dir(path: Path) -> bool:
    try:
        return json.loads((path / PREPROCESS_FILE).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_dir(out: Path, overwrite: bool, model_dir: Path | None) -> None:
    if out.exists() and not out.is_dir():
        raise ClipcraftError(f"Output {out} exists and is not a directory; pass a directory path.")
    if model_dir is not None and out.resolve() == model_dir.resolve():
        raise ClipcraftError(f"Output {out} is the model directory itself; choose another --out.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ClipcraftError(
            f"Output directory {out} already exists and is not empty; pass --overwrite (Python: "
            "overwrite=True) to replace an earlier export, or choose another directory."
        )
    if not _is_export_dir(out):
        raise ClipcraftError(
            f"Output directory {out} is not empty and is not a clipcraft ONNX export (no {PREPROCESS_FILE} "
            "with the export format); refusing to replace it, even with --overwrite."
        )


def export_onnx(
    model: ClipModel | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
) -> OnnxExport:
    """Export ``model``'s image and text sides as two ONNX graphs, with preprocessing and tokenizer files.

    Args:
        model: a :class:`~clipcraft.model.ClipModel` or a saved model directory. Exported in eval mode and
            float32 (from a CPU float32 copy when the model is on another device or dtype); an in-memory
            model is left in the mode it was in.
        out: the directory to write (see the module docstring for its contents). It is written beside the
            target and renamed into place, so an interrupted export leaves nothing half-written.
        overwrite: replace ``out`` when it holds an earlier export. A non-empty directory that is not an
            export is never replaced.
        verify: run both written graphs with ONNX Runtime at two batch sizes and two caption lengths and
            require a cosine of at least :data:`MIN_COSINE` with clipcraft's own embeddings.

    Graphs: ``image.onnx`` maps ``pixel_values`` (B, 3, H, W) float32 to ``image_embeddings`` (B, D);
    ``text.onnx`` maps ``input_ids`` and ``attention_mask`` (B, L) int64 to ``text_embeddings`` (B, D). Both
    outputs are float32 and L2-normalised. B and L are dynamic (L up to the text tower's ``max_length``).

    Raises :class:`~clipcraft.errors.ClipcraftError` before any work when the model directory is missing,
    ``out`` is a non-empty directory (without ``overwrite``) or the export packages are not installed; and
    before writing anything when a tower cannot be traced or converted (the message names the tower and the
    cause). On any failure ``out`` is left as it was.
    """
    start = time.perf_counter()
    _require_packages(verify)
    model_dir: Path | None = None
    if isinstance(model, (str, os.PathLike)):
        model_dir = Path(model)
        if not model_dir.is_dir():
            raise ClipcraftError(f"Model directory not found: {model_dir}")
    target = Path(out)
    _check_out_dir(target, overwrite, model_dir)

    import torch

    from clipcraft.files import atomic_dir
    from clipcraft.model import load

    if model_dir is not None:
        clip = load(model_dir)
    else:
        clip = model
        if clip.device.type != "cpu" or any(p.dtype != torch.float32 for p in clip.parameters()):
            clip = copy.deepcopy(clip).to(
                "cpu", torch.float32
            )  # graphs are float32; the caller's model stays
    was_training = clip.training
    clip.eval()
    try:
        _ = clip.tokenizer  # fail on an unloadable tokenizer before the (slow) tracing
        programs, timings = _capture(clip)

        with atomic_dir(target) as tmp:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                programs["image"].save(str(tmp / IMAGE_GRAPH))
                programs["text"].save(str(tmp / TEXT_GRAPH))
            timings["save"] = time.perf_counter() - t0
            meta = {
                "format": EXPORT_FORMAT,
                "format_version": EXPORT_FORMAT_VERSION,
                "clipcraft_version": __version__,
                "torch_version": torch.__version__,
                "source_model": None if model_dir is None else str(model_dir),
                "embed_dim": clip.embed_dim,
                "embeddings": "float32 (batch, embed_dim), projection head applied, each row L2-normalised: "
                "cosine similarity = dot product",
                "logit_scale": float(clip.logit_scale.detach().exp()),
                "graphs": _graph_io(clip),
                "image": _image_preprocess(clip),
                "text": _write_tokenizer(clip, tmp / TOKENIZER_DIR),
            }
            (tmp / PREPROCESS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            (tmp / README_FILE).write_text(_readme(meta))
            image_cos = text_cos = None
            if verify:
                t0 = time.perf_counter()
                image_cos, text_cos = _verify(clip, tmp)
                timings["verify"] = time.perf_counter() - t0
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    finally:
        clip.train(was_training)
    return OnnxExport(
        out_dir=target,
        files=files,
        embed_dim=clip.embed_dim,
        seconds=time.perf_counter() - start,
        image_cosine=image_cos,
        text_cosine=text_cos,
        timings=timings,
    )


# ----------------------------------------------------------------------------------------------------------
# Command line


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    result = export_onnx(args.model, args.out, overwrite=args.overwrite, verify=not args.no_verify)
    print(json.dumps({**result.__dict__, "out_dir": str(result.out_dir)}) if args.json else result.summary())
    return 0


def register(subparsers: Any, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Add ``export onnx`` and ``export hf`` to the ``clipcraft`` command line (light: torch, ONNX and
    transformers load when they run)."""
    p = subparsers.add_parser(
        "export",
        help="export a model for use without clipcraft",
        epilog="Example:\n  clipcraft export onnx --model models/my-model --out exports/my-model-onnx",
        formatter_class=formatter_class,
    )
    export_sub = p.add_subparsers(dest="export_command", metavar="FORMAT")
    p.set_defaults(func=lambda _args: print_help_and_fail(p))
    o = export_sub.add_parser(
        "onnx",
        help="image and text sides as two ONNX graphs, with preprocessing and tokenizer files",
        description="Write image.onnx (pixels -> image embeddings) and text.onnx (token ids + mask -> text\n"
        "embeddings), both with a dynamic batch (and sequence length), plus preprocess.json, the tokenizer\n"
        "files and README.txt, so the model runs with ONNX Runtime alone. Outputs are L2-normalised\n"
        "embeddings. Before the directory is moved into place, both graphs are run with ONNX Runtime and\n"
        "checked against clipcraft's own embeddings. Needs `pip install 'clipcraft[export]'`.",
        epilog="Examples:\n  clipcraft export onnx --model models/my-model --out exports/my-model-onnx\n"
        "  clipcraft export onnx --model models/my-model --out exports/my-model-onnx --overwrite",
        formatter_class=formatter_class,
    )
    o.add_argument("--model", required=True, help="saved model directory")
    o.add_argument("--out", required=True, help="directory to write (must be new or empty)")
    o.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    o.add_argument(
        "--no-verify", action="store_true", help="skip the ONNX Runtime check against clipcraft's embeddings"
    )
    o.add_argument("--json", action="store_true", help="print the export report as JSON")
    o.set_defaults(func=_cmd_export_onnx)
    h = export_sub.add_parser(
        "hf",
        help="a transformers directory (CLIPModel, SiglipModel or VisionTextDualEncoderModel)",
        description="Write the model as a directory transformers loads without clipcraft: a CLIPModel or\n"
        "SiglipModel for imported (or re-trained) CLIP/SigLIP models, a VisionTextDualEncoderModel for other\n"
        "pairs of transformers towers with linear heads; config, weights, tokenizer, preprocessor_config.json\n"
        "and a model card. Models transformers cannot express (a timm image tower, MLP heads, a mean-pooled\n"
        "sentence-transformers text tower) are refused with the reason.",
        epilog="Example:\n  clipcraft export hf --model models/my-clip --out exports/my-clip-hf\n"
        "  python -c \"from transformers import AutoModel; AutoModel.from_pretrained('exports/my-clip-hf')\"",
        formatter_class=formatter_class,
    )
    h.add_argument("--model", required=True, help="saved model directory (or an importable source)")
    h.add_argument("--out", required=True, help="directory to write (must not exist)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    h.set_defaults(func=_cmd_export_hf)


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from clipcraft.interop.hf import export_hf
    from clipcraft.model import load

    out = export_hf(load(args.model), args.out, overwrite=args.overwrite)
    print(f"Wrote a transformers model to {out} (load it with transformers.AutoModel.from_pretrained).")
    return 0
