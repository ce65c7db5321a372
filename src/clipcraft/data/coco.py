"""Reader for COCO captions JSON: ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``, ``caption``).

Images are looked up under ``image_root``. When it is not given, the first of these folders that holds the first
few listed files is used: the JSON's folder, its ``images/`` subfolder, and the folder named after the split in
the file name beside the JSON's folder (``annotations/captions_train2017.json`` → ``train2017/``).

Counted, never raised: annotations without an ``image_id`` or caption or naming an unknown image, or images
entries without ``id``/``file_name`` (``malformed_row``); captions with bytes that are not UTF-8
(``bad_encoding``) or empty (``empty_caption``); images with no caption (``incomplete_sample``); and, with
``check_files``, missing image files (``missing_file``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from clipcraft.data.dataset import CaptionDataset
from clipcraft.data.report import INCOMPLETE_SAMPLE, MALFORMED_ROW, BadDataReport
from clipcraft.data.table import TableRow, build_records, require_records
from clipcraft.errors import ClipcraftError


def load_coco_json(path: Path) -> dict[str, Any]:
    """The parsed JSON document; raises :class:`ClipcraftError` when it is not COCO-captions shaped."""
    try:
        with path.open("r", encoding="utf-8", errors="surrogateescape") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ClipcraftError(f"COCO captions file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ClipcraftError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    if not is_coco_document(data):
        raise ClipcraftError(
            f"{path} is not a COCO captions file: expected 'images' and 'annotations' lists."
        )
    return data


def is_coco_document(data: Any) -> bool:
    """Whether ``data`` has the ``images`` and ``annotations`` lists of a COCO captions file."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    )


def _guess_image_root(path: Path, file_names: list[str]) -> Path:
    candidates = [path.parent, path.parent / "images"]
    match = re.search(r"(train|val|test)\d{4}", path.stem)
    if match:
        candidates += [path.parent.parent / match.group(0), path.parent / match.group(0)]
    probe = file_names[:5]
    for folder in candidates:
        if probe and all((folder / name).is_file() for name in probe):
            return folder
    return path.parent


def read_coco(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    check_files: bool = True,
) -> CaptionDataset:
    """Read a COCO captions JSON into a :class:`CaptionDataset`, one record per image, in ``images`` order.

    Raises :class:`ClipcraftError` when the file is missing, not JSON, not COCO-shaped, or has no usable row.
    """
    path = Path(path)
    data = load_coco_json(path)
    report = BadDataReport(str(path))
    names: dict[Any, str] = {}
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            report.seen()
            report.add(MALFORMED_ROW, f"{path}: images[{i}]", "needs an 'id' and a 'file_name'")
            continue
        names[entry["id"]] = entry["file_name"]
    root = Path(image_root) if image_root is not None else _guess_image_root(path, list(names.values()))

    captions: dict[Any, list[Any]] = {image_id: [] for image_id in names}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            report.seen()
            report.add(MALFORMED_ROW, where, "needs an 'image_id' and a 'caption'")
        elif ann["image_id"] not in captions:
            report.seen()
            report.add(MALFORMED_ROW, where, f"image_id {ann['image_id']!r} is not in 'images'")
        else:
            captions[ann["image_id"]].append((where, ann["caption"]))

    # Feed the grouped annotations through the shared row logic (caption checks, grouping, file checks).
    rows = [
        TableRow(where, {"image": names[image_id], "caption": caption})
        for image_id, entries in captions.items()
        for where, caption in entries
    ]
    for image_id, entries in captions.items():
        if not entries:
            report.seen()
            report.add(INCOMPLETE_SAMPLE, str(root / names[image_id]), "image has no caption annotation")
    records = build_records(
        rows,
        path=path,
        image_root=root,
        report=report,
        image_column="image",
        caption_column="caption",
        check_files=check_files,
    )
    require_records(records, report, path)
    return CaptionDataset(records, report=report, source=str(path), format="coco")
