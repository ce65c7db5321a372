"""Embedding shards (one process and two gloo processes alike, resumable per shard) and the index built from
them in chunks (same top-10 as exact search; opened memory-mapped)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipcraft.cli import main
from clipcraft.errors import ClipcraftError
from clipcraft.search.ann import IndexConfig, exact_search
from clipcraft.search.embedding_shards import read_manifest, write_arrays_as_shards
from clipcraft.search.index import Index
from clipcraft.search.shard_index import ShardIndex, build_index_from_shards, retune_index


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clipcraft.model import create_model

    return create_model("tiny").save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(11):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(sub / f"p{i:02d}.png")
    (root / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def _read(folder: Path) -> tuple[np.ndarray, list[dict]]:
    manifest = read_manifest(folder)
    assert manifest is not None
    vectors = [np.load(folder / "embeddings" / f"{s['name']}.npy") for s in manifest["shards"]]
    rows = [
        r
        for s in manifest["shards"]
        for r in pq.read_table(folder / "metadata" / f"{s['name']}.parquet").to_pylist()
    ]
    return np.concatenate(vectors), rows


def test_two_gloo_processes_embed_the_same_vectors_as_one(
    model_dir: Path, photos: Path, tmp_path: Path
) -> None:
    flags = ["--model", str(model_dir), "--source", str(photos), "--shard-size", "3", "--dtype", "float32"]
    assert main(["embed", *flags, "--out-dir", str(tmp_path / "one")]) == 1  # 1: broken.jpg was skipped
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
         "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", "-m", "clipcraft.cli", "embed", *flags,
         "--out-dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]  # the rank that met broken.jpg exits 1
    assert "rank 0/2" in proc.stderr and "rank 1/2" in proc.stderr
    one, one_rows = _read(tmp_path / "one")
    two, two_rows = _read(tmp_path / "two")
    assert one.shape == (11, 16) and one.dtype == np.float32
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
    assert two_rows == one_rows
    assert [r["key"] for r in one_rows] == sorted(
        p.relative_to(photos).as_posix() for p in photos.rglob("p*.png")
    )
    manifest = read_manifest(tmp_path / "two")
    assert (
        manifest["count"] == 11
        and manifest["failed_count"] == 1
        and "broken.jpg" in manifest["failed"][0]["where"]
    )
    # the plain encoder gives the same vectors
    from clipcraft.model import load

    plain = load(model_dir).encode_images([str(photos / r["key"]) for r in one_rows])
    np.testing.assert_allclose(one, plain, rtol=0, atol=1e-5)


def test_a_rerun_embeds_only_the_missing_shards(model_dir: Path, photos: Path, tmp_path: Path) -> None:
    from clipcraft.encoding import EncodeSettings
    from clipcraft.model import load
    from clipcraft.search.embedding_shards import embed_to_shards

    model = load(model_dir)
    out = tmp_path / "emb"
    first = embed_to_shards(model, photos, out, settings=EncodeSettings(), shard_size=4)
    assert (first.units, first.embedded) == (3, 3)
    before, _ = _read(out)
    for folder, suffix in (("done", "json"), ("embeddings", "npy")):
        (out / folder / f"000001.{suffix}").unlink()  # as if killed while writing shard 1
    again = embed_to_shards(model, photos, out, settings=EncodeSettings(), shard_size=4)
    assert (again.embedded, again.reused) == (1, 2)
    after, _ = _read(out)
    np.testing.assert_array_equal(after, before)
    from clipcraft.errors import ClipcraftError

    with pytest.raises(ClipcraftError, match="other settings"):
        embed_to_shards(model, photos, out, settings=EncodeSettings(), shard_size=5)


def test_webdataset_shards_embed_with_keys_and_captions(model_dir: Path, tmp_path: Path) -> None:
    from clipcraft.data.shards import write_shards
    from clipcraft.demo import write_scene_dataset

    scenes = write_scene_dataset(tmp_path / "scenes", train=6, val=2, test=2, seed=1)
    write_shards(scenes, tmp_path / "wds", samples_per_shard=4, split="train")
    spec = str(tmp_path / "wds" / "shard-{000000..000001}.tar")
    assert main(["embed", "--model", str(model_dir), "--source", spec, "--out-dir", str(tmp_path / "e")]) == 0
    vectors, rows = _read(tmp_path / "e")
    assert vectors.shape == (6, 16) and vectors.dtype == np.float16
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(6)]
    assert all(r["caption"] and r["path"].endswith(".tar") for r in rows)


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(12, d))
    x = centers[rng.integers(0, 12, n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "flat"])
def test_index_from_shards_returns_the_exact_top10(tmp_path: Path, kind: str) -> None:
    data = _clustered(2050, 32, seed=1)
    stored, queries = data[:2000], data[2000:]  # 50 held-out queries
    parts = [
        (stored[i : i + 600], [f"v{j}" for j in range(i, min(i + 600, 2000))]) for i in range(0, 2000, 600)
    ]
    write_arrays_as_shards(tmp_path / "emb", parts, dim=32, dtype="float32")
    config = IndexConfig(kind=kind, nlist=16, nprobe=16 if kind == "ivf" else None)
    manifest = build_index_from_shards(tmp_path / "emb", tmp_path / "idx", config, chunk=500)
    assert manifest["index"]["kind"] == kind and manifest["count"] == 2000
    index = Index.load(tmp_path / "idx")
    assert isinstance(index, ShardIndex) and isinstance(index.embeddings, np.memmap)
    scores, ids = index.search_vectors(queries, 10)
    truth_scores, truth = exact_search(stored, queries, 10)
    np.testing.assert_array_equal(ids, truth)
    np.testing.assert_allclose(scores, truth_scores, rtol=0, atol=1e-5)
    assert len(index) == 2000 and index.path_of(1234) == "v1234" and index.files[601].path == "v601"


@pytest.mark.parametrize("storage", ["sq8", "pq", "pq4fs"])
def test_tuned_ivf_from_shards_reaches_its_target_recall(tmp_path: Path, storage: str) -> None:
    data, queries = np.split(_clustered(4100, 32, seed=2), [4000])  # 100 held-out queries, same clusters
    write_arrays_as_shards(
        tmp_path / "emb", [(data[:2000], range(2000)), (data[2000:], range(2000, 4000))], dim=32
    )
    manifest = build_index_from_shards(
        tmp_path / "emb",
        tmp_path / "idx",
        IndexConfig(kind="ivf", target_recall=0.95, ivf_storage=storage, refine_factor=8),
    )
    info = manifest["index"]
    assert (
        info["storage"] == storage and info["tuned_recall_at_10"] >= 0.95 and info["nprobe"] <= info["nlist"]
    )
    _, ids = Index.load(tmp_path / "idx").search_vectors(queries, 10)
    _, truth = exact_search(data.astype(np.float16).astype(np.float32), queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist(), strict=True)])
    assert recall >= 0.9


def test_cli_index_build_sharded_then_search(
    model_dir: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "photos.index"
    args = [
        "index",
        "build",
        "--sharded",
        "--model",
        str(model_dir),
        "--images",
        str(photos),
        "--out",
        str(out),
    ]
    assert main([*args, "--shard-size", "4", "--kind", "flat", "--quiet"]) == 0
    assert "11 vectors" in capsys.readouterr().out
    assert (tmp_path / "photos.index.embeddings" / "manifest.json").is_file()
    assert main(["search", str(out), "--image", str(photos / "a" / "p01.png"), "-k", "3", "--json"]) == 0
    import json

    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits[0]["path"] == str(photos / "a" / "p01.png") and hits[0]["score"] == pytest.approx(
        1.0, abs=2e-3
    )


def test_retune_index_reaches_a_new_target_without_rebuilding(tmp_path: Path) -> None:
    data, queries = np.split(_clustered(4100, 32, seed=3), [4000])
    write_arrays_as_shards(
        tmp_path / "emb", [(data[:2000], range(2000)), (data[2000:], range(2000, 4000))], dim=32
    )
    loose = IndexConfig(kind="ivf", target_recall=0.5, ivf_storage="pq4fs", refine_factor=2)
    built = build_index_from_shards(tmp_path / "emb", tmp_path / "idx", loose)["index"]
    faiss_bytes = (tmp_path / "idx" / "index.faiss").read_bytes()
    info = retune_index(tmp_path / "idx", 0.97)
    assert info["tuned_recall_at_10"] >= 0.97 > built["tuned_recall_at_10"]
    assert (info["nprobe"], info["refine_factor"]) != (built["nprobe"], built["refine_factor"])
    assert (tmp_path / "idx" / "index.faiss").read_bytes() == faiss_bytes  # tuned, not rebuilt
    index = Index.load(tmp_path / "idx")  # opens with the new settings
    _, ids = index.search_vectors(queries, 10)
    _, truth = exact_search(data.astype(np.float16).astype(np.float32), queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist(), strict=True)])
    assert recall >= 0.95
    build_index_from_shards(tmp_path / "emb", tmp_path / "flat", IndexConfig(kind="flat"))
    with pytest.raises(ClipcraftError, match="not an IVF index"):
        retune_index(tmp_path / "flat", 0.9)
