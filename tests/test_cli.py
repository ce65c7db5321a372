"""The CLI is a thin main(argv) -> int, tested in-process."""

from __future__ import annotations

import re

import numpy as np
import pytest

from clipcraft.cli import build_parser, main


def test_help_lists_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("presets", "create", "embed", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["presets", "create", "embed", "demo"])
def test_every_subcommand_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "Example" in capsys.readouterr().out


def test_presets_table(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "vit_base_patch16_224.augreg2_in21k_ft_in1k + sentence-transformers/all-mpnet-base-v2" in out


def test_create_then_embed(tmp_path, capsys, rgb_images):
    assert main(["create", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    image_path = tmp_path / "x.png"
    rgb_images[0].save(image_path)
    assert (
        main(["embed", "--model", str(tmp_path / "m"), str(image_path), "--out", str(tmp_path / "e.npy")])
        == 0
    )
    assert np.load(tmp_path / "e.npy").shape == (1, 16)
    assert main(["embed", "--model", str(tmp_path / "m"), "--text", "a dog", "--text", "a cat"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-2:]
    assert len(printed) == 2 and len(printed[0].split()) == 16


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["create", "--preset", "seeed", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipcraft: error: Unknown preset 'seeed'. Did you mean 'seed'?")
    assert main(["embed", "--model", str(tmp_path / "nothing"), "--text", "x"]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_demo_smoke_run_learns_and_reloads(tmp_path, capsys):
    assert main(["demo", "--smoke", "--out", str(tmp_path / "run"), "--steps", "25"]) == 0
    out = capsys.readouterr().out
    loss_first, loss_last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
    recall, chance = map(
        float, re.search(r"recall@1 on the training scenes: ([\d.]+) \(chance ([\d.]+)\)", out).groups()
    )
    assert loss_last < loss_first - 0.2  # it learned: the loss fell ...
    assert recall > chance  # ... and the trained model matches scenes to captions above chance
    assert "bit-identical: True" in out
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_embed_skips_a_bad_file_reports_it_and_keeps_the_rest(tmp_path, capsys):
    import numpy as np
    import torch
    from PIL import Image

    from clipcraft import create_model

    torch.manual_seed(0)
    create_model("tiny").save(tmp_path / "model")
    good = [tmp_path / f"{i}.png" for i in range(2)]
    for i, p in enumerate(good):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(p)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "emb.npy"
    argv = [
        "embed",
        "--model",
        str(tmp_path / "model"),
        str(good[0]),
        str(bad),
        str(good[1]),
        "--out",
        str(out),
    ]
    assert main(argv) == 1  # something was skipped
    captured = capsys.readouterr()
    assert f"skipped {bad}" in captured.err
    assert np.load(out).shape == (2, 16)
    kept = (tmp_path / "emb.paths.txt").read_text().splitlines()
    assert kept == [str(good[0]), str(good[1])]
    assert build_parser().parse_args(["classify", "--model", "m", "-k", "2", "x.png"]).top_k == 2


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_train_and_finetune_take_the_same_run_flags(command, capsys):
    args = build_parser().parse_args(
        [command, "--output-dir", "runs/x", "--device", "cpu", "--precision", "fp32"]
    )
    assert (args.output_dir, args.device, args.precision) == ("runs/x", "cpu", "fp32")
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "bf16 where the hardware has native bf16 (CUDA, or CPUs with AVX512-BF16/AMX), else fp32" in help_text
    )


def test_finetune_still_reads_the_deprecated_out_flag():
    assert build_parser().parse_args(["finetune", "--out", "runs/y"]).output_dir == "runs/y"


def _all_parsers(parser, prefix=()):
    import argparse

    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*prefix, name))


def test_every_flag_has_help_and_says_its_default_once():
    """Help used to print defaults twice ('(default: localhost only) (default: 127.0.0.1)') and --port,
    --batch-size had none."""
    import argparse

    problems = []
    for path, parser in _all_parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(
                action, (argparse._HelpAction, argparse._VersionAction)
            ):
                continue
            where = f"{' '.join(path)} {action.option_strings[-1]}"
            if not action.help:
                problems.append(f"{where}: no help")
                continue
            text = formatter._expand_help(action)
            if text.lower().count("default") > 1:
                problems.append(f"{where}: {text!r}")
            if "(default: None)" in text or "(default: False)" in text:
                problems.append(f"{where}: {text!r}")
    assert not problems, "\n".join(problems)
