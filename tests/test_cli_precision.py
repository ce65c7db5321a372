"""Same numbers on every machine: the commands that embed, run with default settings, give bit-identical
results whether or not the CPU has native bf16 (the hardware probe patched both ways, never the host's);
``--precision bf16`` is used for both sides of each comparison and recorded; the shared flags exist on every
command that embeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcraft.cli import build_parser, main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, 6 captioned images (one broken) and 2 class folders."""
    import torch

    from clipcraft import create_model

    root = tmp_path_factory.mktemp("precision")
    torch.manual_seed(0)
    create_model("tiny").save(root / "model")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    rows = ["image,caption"]
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
        rows += [f"{i}.png,picture {i}", f"{i}.png,another view of {i}"]
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows.append("broken.jpg,broken")
    (images / "captions.csv").write_text("\n".join(rows) + "\n")
    for c, name in enumerate(("cat", "dog")):
        (root / "classes" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (28, 28, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels.astype(np.uint8)).save(root / "classes" / name / f"{i}.png")
    return root


def _run_all(root: Path, out: Path, capsys, extra: list[str]) -> dict[str, object]:
    """index build + search, eval retrieval, eval zeroshot and classify; everything they print or write."""
    model, images = str(root / "model"), str(root / "images")
    got: dict[str, object] = {}
    assert main(["index", "build", "--model", model, "--images", images, "--out", str(out / "idx"), "--quiet", *extra]) == 0  # fmt: skip
    capsys.readouterr()
    got["index_embeddings"] = np.load(out / "idx" / "embeddings.npy")
    got["manifest_precision"] = json.loads((out / "idx" / "manifest.json").read_text())["precision"]
    assert main(["search", str(out / "idx"), "--text", "picture 3", "-k", "5", "--json"]) == 0
    got["search"] = capsys.readouterr().out
    csv = str(root / "images" / "captions.csv")
    assert main(["eval", "retrieval", "--model", model, "--data", csv, "--out", str(out / "r.json"), "--quiet", *extra]) == 0  # fmt: skip
    got["retrieval"] = json.loads((out / "r.json").read_text())
    classes = str(root / "classes")
    assert main(["eval", "zeroshot", "--model", model, "--data", classes, "--out", str(out / "z.json"), "--quiet", *extra]) == 0  # fmt: skip
    got["zeroshot"] = json.loads((out / "z.json").read_text())
    capsys.readouterr()
    files = [str(p) for p in sorted((root / "classes").rglob("*.png"))]
    assert main(["classify", "--model", model, "--labels", "cat,dog", "--json", "--top-k", "2", *extra, *files]) == 0  # fmt: skip
    got["classify"] = capsys.readouterr().out
    for name in ("retrieval", "zeroshot"):
        result = got[name]
        assert isinstance(result, dict)
        result.pop("seconds")
        result.pop("confusion_png", None)
    return got


def test_default_commands_are_bit_identical_with_and_without_native_bf16(
    setup, tmp_path, capsys, monkeypatch
):
    runs = {}
    for native in (False, True):
        monkeypatch.setattr("clipcraft.precision.cpu_has_native_bf16", lambda native=native: native)
        runs[native] = _run_all(setup, tmp_path / str(native), capsys, [])
    plain, bf16_cpu = runs[False], runs[True]
    assert np.array_equal(plain.pop("index_embeddings"), bf16_cpu.pop("index_embeddings"))
    assert plain == bf16_cpu
    assert plain["manifest_precision"] == "fp32"
    assert plain["retrieval"]["precision"] == plain["zeroshot"]["precision"] == "fp32"


def test_bf16_on_request_runs_both_sides_in_bf16_and_is_recorded(setup, tmp_path, capsys, precisions_seen):
    seen = precisions_seen
    bf16 = _run_all(setup, tmp_path / "bf16", capsys, ["--precision", "bf16"])
    assert set(seen) == {"image:bf16", "text:bf16"}  # images, captions, prompts and queries alike
    assert bf16["manifest_precision"] == "bf16"
    assert bf16["retrieval"]["precision"] == bf16["zeroshot"]["precision"] == "bf16"
    seen.clear()
    fp32 = _run_all(setup, tmp_path / "fp32", capsys, [])
    assert set(seen) == {"image:fp32", "text:fp32"}
    # bf16 is close to fp32, not equal: cosine of each image's two embeddings >= 0.99
    a, b = bf16["index_embeddings"], fp32["index_embeddings"]
    assert not np.array_equal(a, b)
    assert ((a * b).sum(1)).min() >= 0.99


def test_a_changed_precision_re_embeds_the_index(setup, tmp_path, capsys) -> None:
    model, images, out = str(setup / "model"), str(setup / "images"), str(tmp_path / "idx")
    assert (
        main(["index", "build", "--model", model, "--images", images, "--out", out, "--quiet", "--json"]) == 0
    )
    first = json.loads(capsys.readouterr().out)
    assert (first["embedded"], first["precision"]) == (5, "fp32")
    argv = ["index", "build", "--model", model, "--images", images, "--out", out, "--quiet", "--json"]
    assert main([*argv, "--precision", "bf16"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (second["embedded"], second["reused"], second["precision"]) == (5, 0, "bf16")
    assert main([*argv, "--precision", "bf16"]) == 0
    third = json.loads(capsys.readouterr().out)
    assert (third["embedded"], third["reused"]) == (0, 5)


@pytest.mark.parametrize(
    "command",
    [["embed"], ["create"], ["index", "build"], ["classify"], ["eval", "retrieval"], ["eval", "zeroshot"]],
)
def test_every_embedding_command_takes_device_and_says_what_auto_means(command, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--device" in text
    if command != ["create"]:
        assert "--precision" in text and "native bf16" in text and "AVX512-BF16 or AMX" in text
        assert "default: fp32" in text
    assert "at most 4" not in text and "bf16 on CUDA, else fp32" not in text


@pytest.mark.parametrize("group", [["eval"], ["index"], ["export"]])
def test_a_command_group_without_an_action_prints_help_and_exits_2(group, capsys) -> None:
    assert main(group) == 2
    assert "usage:" in capsys.readouterr().out


def test_embed_runs_on_the_given_device_and_precision(setup, tmp_path, capsys) -> None:
    out32, out16 = tmp_path / "a.npy", tmp_path / "b.npy"
    texts = ["--text", "a dog", "--text", "a much longer caption about a cat"]
    model = str(setup / "model")
    assert main(["embed", "--model", model, *texts, "--out", str(out32), "--device", "cpu"]) == 0
    assert main(["embed", "--model", model, *texts, "--out", str(out16), "--precision", "bf16"]) == 0
    assert "(bf16)" in capsys.readouterr().out
    a, b = np.load(out32), np.load(out16)
    assert a.shape == b.shape == (2, 16) and not np.array_equal(a, b)
    assert ((a * b).sum(1)).min() >= 0.99
    assert main(["embed", "--model", model, *texts, "--device", "nonsense"]) == 2
