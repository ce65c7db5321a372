"""``clipcraft eval ...`` and ``clipcraft classify`` in-process: JSON keys and values, help, errors, real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcraft.cli import build_parser, main
from clipcraft.evaluation.runners import CLASSIFICATION_KEYS, RETRIEVAL_KEYS


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> str:
    return str(tiny_model.save(tmp_path_factory.mktemp("model") / "tiny"))


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def cifar_like(tmp_path: Path) -> Path:
    """root/{train,test}/{ant,bee}/*.png with one corrupt test image."""
    root = tmp_path / "mini"
    for split, count in (("train", 5), ("test", 2)):
        for c, name in enumerate(("ant", "bee")):
            for i in range(count):
                _image(root / split / name / f"{i}.png", 100 * c + 10 * (split == "test") + i)
    (root / "test" / "bee" / "9.jpg").write_bytes(b"not a jpeg at all")
    return root


@pytest.mark.parametrize(
    "argv",
    [["eval"], ["eval", "retrieval"], ["eval", "zeroshot"], ["eval", "linear-probe"], ["classify"]],
)
def test_every_eval_command_has_help_with_an_example(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "Example" in capsys.readouterr().out


def test_registration_imports_no_torch_or_sklearn() -> None:
    code = (
        "import argparse, sys\n"
        "from clipcraft.evaluation import commands\n"
        "commands.register(argparse.ArgumentParser().add_subparsers(), argparse.HelpFormatter)\n"
        "heavy = [m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_zeroshot_writes_json_and_confusion_png(model_dir, cifar_like, tmp_path, capsys) -> None:
    out = tmp_path / "res" / "zs.json"
    argv = ["eval", "zeroshot", "--model", model_dir, "--data", str(cifar_like), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean_per_class_recall" in printed and "Skipped 1 image" in printed
    result = json.loads(out.read_text())
    assert set(CLASSIFICATION_KEYS) <= set(result)
    assert (result["num_images"], result["num_classes"], result["num_skipped"]) == (4, 2, 1)
    assert all(0.0 <= result[k] <= 1.0 for k in ("top1", "top5", "mean_per_class_recall"))
    assert Path(result["confusion_png"]) == tmp_path / "res" / "zs.confusion.png"
    assert Path(result["confusion_png"]).is_file()


def test_eval_linear_probe_from_a_split_root(model_dir, cifar_like, tmp_path, capsys) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "lp.json"
    argv = ["eval", "linear-probe", "--model", model_dir, "--data", str(cifar_like), "--features", "pre"]
    assert main([*argv, "--out", str(out), "--quiet", "--metrics", "top1"]) == 0
    result = json.loads(out.read_text())
    assert set(CLASSIFICATION_KEYS) <= set(result)
    assert (result["num_train"], result["num_images"], result["num_skipped"]) == (10, 4, 1)
    assert result["features"] == "pre"
    assert "top5" not in capsys.readouterr().out  # --metrics limits the table, not the JSON


def test_eval_retrieval_json_keys(model_dir, tmp_path, capsys) -> None:
    rows = ["image,caption"]
    for i in range(3):
        _image(tmp_path / "d" / f"{i}.png", i)
        rows += [f"{i}.png,caption {i} a", f"{i}.png,caption {i} b"]
    (tmp_path / "d" / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "r.json"
    argv = ["eval", "retrieval", "--model", model_dir, "--data", str(tmp_path / "d" / "pairs.csv")]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert set(RETRIEVAL_KEYS) <= set(result)
    assert (result["num_images"], result["num_captions"], result["split"]) == (3, 6, "all")
    assert result["i2t_r5"] == 1.0  # 3 images: every rank is at most 3
    assert 1.0 <= result["t2i_mean_rank"] <= 3.0


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["retrieval", "--data", "{cls}"], "has no captions"),
        (["zeroshot", "--data", "{empty}"], "hold no image files: wasp"),
        (["zeroshot", "--data", "{cls}", "--metrics", "top1,acc"], "Unknown zeroshot metric 'acc'"),
        (["linear-probe", "--train-data", "{cls}"], "needs --data ROOT"),
    ],
)
def test_bad_input_is_one_line_exit_2(model_dir, cifar_like, argv_tail, message, capsys) -> None:
    empty = cifar_like / "test"
    (empty / "wasp").mkdir()
    cls = cifar_like / "train"
    argv = ["eval", argv_tail[0], "--model", model_dir, "--quiet"]
    argv += [a.format(cls=cls, empty=empty) for a in argv_tail[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipcraft: error:") and message in err and "\n" not in err


def test_missing_model_dir_is_a_clear_error(cifar_like, tmp_path, capsys) -> None:
    argv = ["eval", "zeroshot", "--model", str(tmp_path / "none"), "--data", str(cifar_like)]
    assert main(argv) == 2
    assert "is not a clipcraft model directory: config.json is missing" in capsys.readouterr().err


def test_classify_prints_labels_and_skips_bad_files(model_dir, cifar_like, capsys) -> None:
    good = [str(cifar_like / "test" / "ant" / f"{i}.png") for i in range(2)]
    bad = str(cifar_like / "test" / "bee" / "9.jpg")
    assert main(["classify", "--model", model_dir, "--labels", "cat,dog,car", *good, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(good[0])
    assert all(line.split("\t")[1].split()[0] in ("cat", "dog", "car") for line in lines)

    argv = ["classify", "--model", model_dir, "--labels", "cat,dog", good[0], bad, "--json", "--top-k", "2"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    row = json.loads(captured.out.strip())
    assert row["image"] == good[0]
    (first, p_first), (second, p_second) = row["top"]  # both labels, most probable first
    assert {first, second} == {"cat", "dog"} and row["label"] == first and p_first >= p_second
    assert p_first + p_second == pytest.approx(1.0, abs=1e-6)
    assert "skipped" in captured.err and "9.jpg" in captured.err
    assert main(["classify", "--model", model_dir, "--labels", " , ", good[0]]) == 2


def test_one_label_is_accepted_with_probability_one(model_dir, cifar_like, tmp_path, capsys) -> None:
    image = str(cifar_like / "test" / "ant" / "0.png")
    assert main(["classify", "--model", model_dir, "--labels", "ant", image, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top"] == [["ant", 1.0]]
    one_class = tmp_path / "one"
    _image(one_class / "ant" / "0.png", 1)
    out = tmp_path / "zs.json"
    argv = ["eval", "zeroshot", "--model", model_dir, "--data", str(one_class), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert (result["num_classes"], result["top1"]) == (1, 1.0)


@pytest.mark.data
def test_real_data_subsets_with_the_tiny_model(model_dir, shared_data, tmp_path) -> None:
    zs, rt = tmp_path / "zs.json", tmp_path / "rt.json"
    cifar = str(shared_data / "cifar10")
    argv = ["eval", "zeroshot", "--model", model_dir, "--data", cifar, "--limit-per-class", "2", "--quiet"]
    assert main([*argv, "--out", str(zs)]) == 0
    result = json.loads(zs.read_text())
    assert (result["num_images"], result["num_classes"], result["num_skipped"]) == (20, 10, 0)
    assert result["data"].endswith("cifar10/test")

    flickr = str(shared_data / "flickr8k")
    argv = ["eval", "retrieval", "--model", model_dir, "--data", flickr, "--limit", "8", "--quiet"]
    assert main([*argv, "--out", str(rt)]) == 0
    result = json.loads(rt.read_text())
    assert (result["split"], result["num_images"], result["num_captions"]) == ("test", 8, 40)
    assert set(RETRIEVAL_KEYS) <= set(result)
