"""`clipcraft index build` and `clipcraft search`, in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipcraft.cli import build_parser, main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A model, a folder of 8 images (one corrupt) with captions, and its index built by the CLI."""
    import torch

    from clipcraft import create_model

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    create_model("tiny").save(root / "model")
    rng = np.random.default_rng(0)
    (root / "images" / "nested").mkdir(parents=True)
    for i in range(7):
        colour = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(np.zeros((40, 40, 3), np.uint8) + colour).save(root / "images" / f"{i}.png")
    (root / "images" / "nested" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "captions.txt").write_text("a dog\na cat\na red car\n")
    return root


@pytest.mark.parametrize("command", [["index"], ["index", "build"], ["search"], ["serve"]])
def test_subcommands_have_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "Example" in capsys.readouterr().out


def test_build_then_search_table_json_and_grid(built, capsys):
    index = built / "index"
    args = ["index", "build", "--model", str(built / "model"), "--images", str(built / "images")]
    assert (
        main([*args, "--out", str(index), "--captions", str(built / "captions.txt"), "--quiet", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (report["total"], report["skipped_count"], report["captions"]) == (7, 1, 3)
    assert report["skipped"][0][0] == "nested/broken.jpg"

    assert main(["search", str(index), "--text", "a dog on the grass", "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "path"] and len(table) == 4

    grid = built / "sheet.png"
    assert (
        main(
            ["search", str(index), "--image", str(built / "images" / "2.png"), "--json", "--grid", str(grid)]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == list(range(1, 8))
    assert rows[0]["path"].endswith("2.png") and rows[0]["score"] == pytest.approx(1.0, abs=1e-4)
    with Image.open(grid) as sheet:
        assert sheet.format == "PNG" and sheet.width > 400

    assert (
        main(["search", str(index), "--image", str(built / "images" / "0.png"), "--captions", "--json"]) == 0
    )
    captions = [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]
    assert sorted(captions) == ["a cat", "a dog", "a red car"]


def test_search_errors_speak_to_the_user(built, tmp_path, capsys):
    assert main(["search", str(tmp_path), "--text", "x"]) == 2
    assert "not a clipcraft index" in capsys.readouterr().err
    assert main(["search", str(tmp_path), "--text", "x", "--image", "y.png"]) == 2
    assert "one query" in capsys.readouterr().err
    assert main(["search", str(tmp_path), "--text", "x", "-k", "0"]) == 2


def test_grid_is_capped_and_says_so_and_k_has_a_long_name(built, tmp_path, capsys, monkeypatch):
    from clipcraft.search import sheet

    monkeypatch.setattr(sheet, "MAX_SHEET_RESULTS", 3)
    index = built / "index"
    if not index.is_dir():
        assert main(["index", "build", "--model", str(built / "model"), "--images", str(built / "images"), "--out", str(index), "--quiet"]) == 0  # fmt: skip
    grid = tmp_path / "new" / "folder" / "g.png"
    assert main(["search", str(index), "--text", "a dog", "--top-k", "6", "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 6  # the table: all 6
    assert "the sheet shows the first 3 of 6 results" in out
    assert f"created {grid.parent}" in out
    with Image.open(grid) as img:
        cols, rows = 4, 1  # query + 3 results, one row
        assert img.width <= cols * 250 and img.height <= rows * 300


def test_ctrl_c_in_index_build_says_what_was_saved_and_how_to_continue(built, tmp_path, capsys, monkeypatch):
    """Ctrl-C used to end in a raw KeyboardInterrupt traceback."""
    import clipcraft.encoding as encoding

    real = encoding.iter_images

    def interrupted_after_one_batch(*args, **kwargs):
        for n, batch in enumerate(real(*args, **kwargs)):
            if n == 1:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(encoding, "iter_images", interrupted_after_one_batch)
    out = tmp_path / "photos.index"
    argv = ["index", "build", "--model", str(built / "model"), "--images", str(built / "images")]
    argv += ["--out", str(out), "--batch-size", "2", "--quiet"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "2 images embedded so far are saved" in err and f".{out.name}.partial" in err
    assert "clipcraft index build --model" in err and f"--out {out}" in err
    monkeypatch.setattr(encoding, "iter_images", real)
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] == 2
