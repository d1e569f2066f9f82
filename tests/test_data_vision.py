"""Image suites on fake local data: few-shot protocol and cache, base-to-new, ImageNet shifts with the
200-class projection, cross-dataset transfer, error messages, registration."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saftune.data.base import Benchmark
from saftune.data.registry import load_dataset
from saftune.data.vision import fewshot, protocol
from saftune.data.vision.base2new import base_new_classes, select_classes
from saftune.data.vision.coop import COOP_DATASETS, SplitFileError, coop_source, read_split_file
from saftune.data.vision.fewshot import few_shot_indices
from saftune.data.vision.folder import image_folder
from saftune.data.vision.imagenet import imagenet_variant, project_logits
from saftune.data.vision.paths import DatasetNotFoundError


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # Never read the developer's real data root or write to their home cache.
    monkeypatch.delenv("SAFTUNE_DATA", raising=False)
    monkeypatch.setenv("SAFTUNE_CACHE", str(tmp_path / "user-cache"))


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # the readers only list paths; no pixel is decoded here
    return path


def make_coop(root: Path, name: str, classes: list[str], n_train=(20,), n_val=6, n_test=5) -> Path:
    """A fake CoOp dataset: images under its image folder and a split_zhou file. `n_train` is one count
    for all classes or one per class."""
    spec = COOP_DATASETS[name]
    folder = root / spec.folder
    image_root = folder / spec.image_dir if spec.image_dir else folder
    counts = list(n_train) * len(classes) if len(n_train) == 1 else list(n_train)
    split = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(classes):
        for part, n in (("train", counts[label]), ("val", n_val), ("test", n_test)):
            for i in range(n):
                rel = f"{cls.replace(' ', '_')}/{part}_{i:03d}.jpg"
                touch(image_root / rel)
                split[part].append([rel, label, cls])
    (folder / spec.split_file).write_text(json.dumps(split))
    return folder


WNIDS = ["n03", "n01", "n05", "n02", "n06", "n04"]  # written unsorted: labels follow sorted wnids
NAMES = {"n01": "tench", "n02": "goldfish", "n03": "shark", "n04": "hen", "n05": "ostrich", "n06": "robin"}


def make_imagenet(root: Path, n_train=10, n_val=3) -> Path:
    """A made-up 6-class ImageNet with all four shifts; A and R hold 3 of the 6 classes."""
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text("".join(f"{w} {NAMES[w]}\n" for w in WNIDS))
    for w in WNIDS:
        for i in range(n_train):
            touch(root / "imagenet/images/train" / w / f"{w}_{i}.JPEG")
        for i in range(n_val):
            touch(root / "imagenet/images/val" / w / f"val_{w}_{i}.JPEG")
        touch(root / "imagenet-sketch/images" / w / "sketch_0.jpg")
    for label in range(6):
        touch(root / "imagenetv2/imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg")
    for w in ["n05", "n02", "n04"]:  # labels 4, 1, 3
        touch(root / "imagenet-adversarial/imagenet-a" / w / "0.jpg")
        touch(root / "imagenet-adversarial/imagenet-a" / w / "1.jpg")
    (root / "imagenet-adversarial/imagenet-a/README.txt").write_text("not a class")
    for w in ["n01", "n03", "n06"]:  # labels 0, 2, 5
        touch(root / "imagenet-rendition/imagenet-r" / w / "0.jpg")
    return root


# --------------------------------------------------------------------------------------------------
# few-shot sampling


def test_few_shot_exactly_k_per_class_and_deterministic():
    labels = np.repeat(np.arange(5), 30)
    a = few_shot_indices(labels, shots=4, seed=1)
    assert np.bincount(labels[a]).tolist() == [4] * 5
    assert np.array_equal(a, few_shot_indices(labels, shots=4, seed=1))
    assert not np.array_equal(a, few_shot_indices(labels, shots=4, seed=2))
    assert not np.array_equal(a, few_shot_indices(labels, shots=4, seed=1, stream=1))
    assert len(np.unique(a)) == len(a) and np.all(np.diff(a) > 0)


def test_few_shot_independent_of_pool_order_and_other_classes():
    keys = [f"img_{i:03d}" for i in range(60)]
    labels = np.arange(60) % 3
    picked = {keys[i] for i in few_shot_indices(labels, 5, seed=3, keys=keys)}
    perm = np.random.default_rng(0).permutation(60)
    picked_perm = {keys[perm[i]] for i in few_shot_indices(labels[perm], 5, seed=3, keys=[keys[i] for i in perm])}
    assert picked == picked_perm
    # Dropping class 2 from the pool does not change the draws of classes 0 and 1.
    keep = labels < 2
    sub_keys = [k for k, m in zip(keys, keep) if m]
    picked_sub = {sub_keys[i] for i in few_shot_indices(labels[keep], 5, seed=3, keys=sub_keys)}
    assert picked_sub == {k for k in picked if labels[keys.index(k)] < 2}


def test_few_shot_short_class_takes_all_with_warning(caplog):
    labels = np.array([0] * 10 + [1] * 3 + [2] * 8)
    with caplog.at_level(logging.WARNING, logger="saftune.data.vision.fewshot"):
        idx = few_shot_indices(labels, shots=5, seed=1, classnames=["a", "b", "c"])
    assert np.bincount(labels[idx]).tolist() == [5, 3, 5]
    assert set(np.flatnonzero(labels == 1)) <= set(idx.tolist())
    assert any("fewer than 5" in r.getMessage() and "'b'" in r.getMessage() for r in caplog.records)


def test_few_shot_exclude():
    labels = np.repeat(np.arange(2), 6)
    train = few_shot_indices(labels, 4, seed=1)
    val = few_shot_indices(labels, 2, seed=1, stream=1, exclude=train)
    assert not set(train) & set(val)
    assert np.bincount(labels[val]).tolist() == [2, 2]
    with pytest.raises(ValueError, match="shots"):
        few_shot_indices(labels, 0, seed=1)


# --------------------------------------------------------------------------------------------------
# CoOp datasets and the cache


def test_coop_fewshot_benchmark_and_cache(tmp_path, monkeypatch):
    classes = ["abyssinian", "bengal", "boxer", "pug"]
    folder = make_coop(tmp_path, "oxford-pets", classes, n_train=(20,), n_val=6, n_test=5)
    b = load_dataset("oxford-pets", root=tmp_path, shots=8, seed=1)
    assert isinstance(b, Benchmark) and b.modality == "image"
    assert b.classnames == classes
    assert b.templates == ["a photo of a {}, a type of pet."]
    assert b.train.class_counts(4).tolist() == [8] * 4
    assert b.val.class_counts(4).tolist() == [4] * 4  # min(8, 4) from the split's val
    assert len(b.test) == 20 and b.ood == {}
    assert all(isinstance(p, Path) and p.is_file() for p in b.train.inputs)
    assert all("/train_" in p.as_posix() for p in b.train.inputs)
    assert all("/val_" in p.as_posix() for p in b.val.inputs)
    # The label of every image is its folder's class.
    assert all(classes[y] == p.parent.name for p, y in zip(b.train.inputs, b.train.labels))

    cache = folder / "split_fewshot" / "shot_8-seed_1.json"
    assert cache.is_file() and b.info["fewshot_cache"] == str(cache)
    rows = json.loads(cache.read_text())
    assert rows["shots"] == 8 and rows["seed"] == 1 and len(rows["train"]) == 32 and len(rows["val"]) == 16
    assert rows["train"][0][0].startswith(("abyssinian/", "bengal/"))  # relative to the image folder

    # Reused: a second load never samples, and returns the identical images.
    monkeypatch.setattr(protocol, "_sample", lambda *a, **k: pytest.fail("resampled despite a valid cache"))
    again = load_dataset("oxford-pets", root=tmp_path, shots=8, seed=1)
    assert again.train.inputs == b.train.inputs and again.val.inputs == b.val.inputs
    # ... and it is the cache that decides: edit it, and the edit is what gets loaded.
    rows["train"] = rows["train"][:3]
    cache.write_text(json.dumps(rows))
    assert len(load_dataset("oxford-pets", root=tmp_path, shots=8, seed=1).train) == 3


def test_seeds_give_different_samples_and_each_is_stable(tmp_path):
    make_coop(tmp_path, "dtd", ["banded", "woven", "zigzagged"], n_train=(16,))
    draws = [set(map(str, load_dataset("dtd", root=tmp_path, shots=4, seed=s).train.inputs)) for s in (1, 2, 3)]
    assert len({frozenset(d) for d in draws}) == 3
    assert set(map(str, load_dataset("dtd", root=tmp_path, shots=4, seed=2).train.inputs)) == draws[1]
    assert {p.name for p in (tmp_path / "dtd" / "split_fewshot").iterdir()} == {
        "shot_4-seed_1.json",
        "shot_4-seed_2.json",
        "shot_4-seed_3.json",
    }


def test_short_class_in_coop_dataset(tmp_path, caplog):
    make_coop(tmp_path, "eurosat", ["forest", "river", "sea lake"], n_train=(20, 3, 20))
    with caplog.at_level(logging.WARNING):
        b = load_dataset("eurosat", root=tmp_path, shots=16, seed=1)
    assert b.train.class_counts(3).tolist() == [16, 3, 16]
    assert b.templates == ["a centered satellite photo of {}."]
    assert any("fewer than 16" in r.getMessage() for r in caplog.records)


def test_cache_falls_back_to_user_cache_when_data_is_read_only(tmp_path, monkeypatch):
    folder = make_coop(tmp_path / "data", "food101", ["pizza", "ramen"], n_train=(10,))
    real = fewshot.is_writable
    monkeypatch.setattr(
        fewshot, "is_writable", lambda d: False if folder in Path(d).parents or Path(d) == folder else real(d)
    )
    b = load_dataset("food101", root=tmp_path / "data", shots=2, seed=1)
    assert not (folder / "split_fewshot").exists()
    cached = Path(b.info["fewshot_cache"])
    assert cached.is_file() and (tmp_path / "user-cache" / "fewshot") in cached.parents
    assert cached.name == "shot_2-seed_1.json"
    monkeypatch.setattr(protocol, "_sample", lambda *a, **k: pytest.fail("resampled"))
    assert load_dataset("food101", root=tmp_path / "data", shots=2, seed=1).train.inputs == b.train.inputs


def test_explicit_cache_dir(tmp_path):
    folder = make_coop(tmp_path / "data", "caltech101", ["face", "leopard"], n_train=(10,))
    b = load_dataset("caltech101", root=tmp_path / "data", shots=2, seed=1, cache_dir=tmp_path / "mycache")
    assert Path(b.info["fewshot_cache"]) == tmp_path / "mycache" / "caltech101" / "shot_2-seed_1.json"
    assert not (folder / "split_fewshot").exists()


def test_stale_cache_is_resampled(tmp_path, caplog):
    folder = make_coop(tmp_path, "ucf101", ["Apply_Eye_Makeup", "Archery"], n_train=(10,))
    first = load_dataset("ucf101", root=tmp_path, shots=2, seed=1)
    cache = folder / "split_fewshot" / "shot_2-seed_1.json"
    # The split file is re-issued with a renamed class: the cached rows no longer match it.
    split_file = folder / "split_zhou_UCF101.json"
    split_file.write_text(split_file.read_text().replace('"Archery"', '"Archery Range"'))
    with caplog.at_level(logging.WARNING):
        second = load_dataset("ucf101", root=tmp_path, shots=2, seed=1)
    assert any("do not match the dataset; resampling" in r.getMessage() for r in caplog.records)
    assert second.classnames == ["Apply_Eye_Makeup", "Archery Range"]
    assert {r[2] for r in json.loads(cache.read_text())["train"]} == {"Apply_Eye_Makeup", "Archery Range"}
    assert second.train.inputs == first.train.inputs  # same rule, same pool: the same images
    # An image of the cached sample disappears: the cache is not trusted either.
    caplog.clear()
    first.train.inputs[0].unlink()
    with caplog.at_level(logging.WARNING):
        load_dataset("ucf101", root=tmp_path, shots=2, seed=1)
    assert any("is missing; resampling" in r.getMessage() for r in caplog.records)


def test_full_data_mode(tmp_path):
    folder = make_coop(tmp_path, "sun397", ["abbey", "airport", "bakery"], n_train=(7,), n_val=2)
    b = load_dataset("sun397", root=tmp_path, shots=None)
    assert len(b.train) == 21 and len(b.val) == 6 and b.info["shots"] is None
    assert not (folder / "split_fewshot").exists()


def test_stanford_cars_image_root_is_the_folder(tmp_path):
    folder = make_coop(tmp_path, "stanford-cars", ["2000 AM General Hummer SUV", "2012 Acura RL Sedan"], n_train=(4,))
    b = load_dataset("stanford-cars", root=tmp_path, shots=2)
    assert all(p.is_relative_to(folder) for p in b.train.inputs)
    assert b.classnames[0] == "2000 AM General Hummer SUV"


def test_fgvc_aircraft_text_files(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "Cessna 172", "F/A-18"]
    folder.mkdir()
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    for part, n in (("train", 5), ("val", 2), ("test", 2)):
        lines = []
        for label, v in enumerate(variants):
            for i in range(n):
                image_id = f"{part[:2]}{label}{i:04d}"
                touch(folder / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {v}")
        (folder / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    b = load_dataset("fgvc-aircraft", root=tmp_path, shots=3, seed=1)
    assert b.classnames == variants
    assert b.train.class_counts(3).tolist() == [3, 3, 3] and b.val.class_counts(3).tolist() == [2, 2, 2]
    assert b.templates == ["a photo of a {}, a type of aircraft."]
    assert Benchmark.prompts(b)[1] == ["a photo of a Cessna 172, a type of aircraft."]


def test_split_file_errors_name_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": [["a.jpg", 0, "cat"], ["b.jpg", 0, "dog"]], "val": [], "test": []}))
    with pytest.raises(SplitFileError, match="split.json.*label 0 is named both"):
        read_split_file(bad, tmp_path / "images")
    bad.write_text(json.dumps({"train": [["a.jpg", 1, "cat"]], "val": [], "test": []}))
    with pytest.raises(SplitFileError, match=r"missing \[0\]"):
        read_split_file(bad, tmp_path / "images")
    bad.write_text("{not json")
    with pytest.raises(SplitFileError, match="split.json"):
        read_split_file(bad, tmp_path / "images")


# --------------------------------------------------------------------------------------------------
# missing data


def test_missing_dataset_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("oxford-pets", root=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "oxford_pets") in msg and "split_zhou_OxfordPets.json" in msg and "images/" in msg
    (tmp_path / "oxford_pets" / "images").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="split_zhou_OxfordPets.json"):
        load_dataset("oxford-pets", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="classnames.txt"):
        (tmp_path / "imagenet" / "images").mkdir(parents=True)
        load_dataset("imagenet", root=tmp_path)


def test_no_root_mentions_env_var_and_env_var_works(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="SAFTUNE_DATA"):
        load_dataset("dtd")
    make_coop(tmp_path, "dtd", ["banded", "woven"], n_train=(4,))
    monkeypatch.setenv("SAFTUNE_DATA", str(tmp_path))
    assert len(load_dataset("dtd", shots=2).train) == 4
    # root may also point straight at the dataset's folder
    assert len(load_dataset("dtd", root=tmp_path / "dtd", shots=2).train) == 4


def test_misplaced_images_are_reported(tmp_path):
    folder = make_coop(tmp_path, "oxford-pets", ["pug"], n_train=(2,))
    (folder / "images").rename(folder / "imgs")
    (folder / "images").mkdir()
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        coop_source("oxford-pets", tmp_path)


def test_bad_options():
    with pytest.raises(ValueError, match="subsample"):
        load_dataset("dtd", root=".", subsample="half")
    with pytest.raises(ValueError, match="shots"):
        load_dataset("image-folder", root=".", shots=-1)


# --------------------------------------------------------------------------------------------------
# base-to-new


def test_base_new_split_rule():
    assert base_new_classes(5) == ([0, 1, 2], [3, 4])
    assert base_new_classes(4) == ([0, 1], [2, 3])
    assert base_new_classes(1) == ([0], [])


def test_base_to_new_benchmark(tmp_path):
    classes = ["banded", "blotchy", "braided", "bubbly", "bumpy"]
    make_coop(tmp_path, "dtd", classes, n_train=(10,), n_val=5, n_test=3)
    full = load_dataset("dtd", root=tmp_path, shots=4, seed=1)
    base = load_dataset("dtd", root=tmp_path, shots=4, seed=1, subsample="base")
    assert base.classnames == ["banded", "blotchy", "braided"]
    assert base.name == "dtd/base" and base.info["base_classes"] == [0, 1, 2] and base.info["new_classes"] == [3, 4]
    for split in (base.train, base.val, base.test):
        assert set(split.labels.tolist()) == {0, 1, 2}
        assert all(base.classnames[y] == p.parent.name for p, y in zip(split.inputs, split.labels))
    assert set(base.ood) == {"new"}
    new = base.ood["new"]
    assert new.classnames == ["bubbly", "bumpy"] and new.labels.tolist() == [0] * 3 + [1] * 3
    assert all(new.classnames[y] == p.parent.name for p, y in zip(new.inputs, new.labels))
    assert base.prompts(new) == [["bubbly texture."], ["bumpy texture."]]
    # The base classes' shots are the same images as in the all-class benchmark (one cache file).
    assert set(base.train.inputs) == {p for p, y in zip(full.train.inputs, full.train.labels) if y < 3}
    only_new = load_dataset("dtd", root=tmp_path, shots=4, seed=1, subsample="new")
    assert only_new.classnames == ["bubbly", "bumpy"] and only_new.ood == {}
    assert set(only_new.test.labels.tolist()) == {0, 1} and len(only_new.test) == 6


def test_select_classes_relabels():
    from saftune.data.base import Split

    s = Split("x", ["a", "b", "c", "d", "e"], [4, 0, 3, 4, 1])
    sub = select_classes(s, [3, 4], classnames=["three", "four"], name="y")
    assert sub.inputs == ["a", "c", "d"] and sub.labels.tolist() == [1, 0, 1] and sub.name == "y"


# --------------------------------------------------------------------------------------------------
# ImageNet and its shifts


def test_imagenet_reader_labels_follow_sorted_wnids(tmp_path):
    make_imagenet(tmp_path)
    b = load_dataset("imagenet", root=tmp_path, shots=4, seed=1)
    assert b.classnames == ["tench", "goldfish", "shark", "hen", "ostrich", "robin"]
    assert b.train.class_counts(6).tolist() == [4] * 6
    assert b.val.class_counts(6).tolist() == [4] * 6
    assert not set(b.train.inputs) & set(b.val.inputs)  # val carved from train, disjoint
    assert all("/train/" in p.as_posix() for p in b.val.inputs)
    assert len(b.test) == 18 and all("/val/" in p.as_posix() for p in b.test.inputs)
    wnids = sorted(NAMES)
    for split in (b.train, b.test):
        assert all(p.parent.name == wnids[y] for p, y in zip(split.inputs, split.labels))
    assert (tmp_path / "imagenet/split_fewshot/shot_4-seed_1.json").is_file()


def test_imagenet_full_data_holds_out_validation(tmp_path):
    make_imagenet(tmp_path, n_train=10)
    b = load_dataset("imagenet", root=tmp_path, shots=None)
    # 4 per class asked, capped at 10% of a class's 10 images: 1 held out, 9 left to train on.
    assert b.val.class_counts(6).tolist() == [1] * 6 and b.train.class_counts(6).tolist() == [9] * 6
    assert not set(b.train.inputs) & set(b.val.inputs) and b.info["fewshot_cache"] is None


def test_imagenet_cache_hit_does_not_list_training_folders(tmp_path, monkeypatch):
    make_imagenet(tmp_path)
    first = load_dataset("imagenet", root=tmp_path, shots=2, seed=1)
    import saftune.data.vision.imagenet as inet

    real = inet._wnid_folder_split
    monkeypatch.setattr(
        inet,
        "_wnid_folder_split",
        lambda folder, *a: pytest.fail("listed the training pool") if folder.name == "train" else real(folder, *a),
    )
    assert load_dataset("imagenet", root=tmp_path, shots=2, seed=1).train.inputs == first.train.inputs


def test_imagenet_flat_val_folder_is_explained(tmp_path):
    make_imagenet(tmp_path)
    val = tmp_path / "imagenet/images/val"
    for p in list(val.rglob("*.JPEG")):
        p.rename(val / p.name)
    for d in val.iterdir():
        if d.is_dir():
            d.rmdir()
    with pytest.raises(DatasetNotFoundError, match="18 images directly.*one folder per"):
        load_dataset("imagenet", root=tmp_path, shots=2)


def test_imagenet_shift_ood_and_200_class_projection(tmp_path):
    make_imagenet(tmp_path)
    b = load_dataset("imagenet-shift", root=tmp_path, shots=2, seed=1)
    assert set(b.ood) == {"imagenet-v2", "imagenet-sketch", "imagenet-a", "imagenet-r"}
    assert b.info["variants"] == ["imagenet-v2", "imagenet-sketch", "imagenet-a", "imagenet-r"]
    v2, sketch = b.ood["imagenet-v2"], b.ood["imagenet-sketch"]
    assert v2.class_subset is None and v2.labels.tolist() == list(range(6))
    assert sketch.class_subset is None and sorted(sketch.labels.tolist()) == list(range(6))
    assert v2.classnames is None  # the benchmark's 1000 (here 6) classes

    a = b.ood["imagenet-a"]
    # wnids n02, n04, n05 -> ImageNet labels 1, 3, 4, in label order; labels renumbered 0..2.
    assert a.class_subset == [1, 3, 4]
    assert a.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [a.class_subset[y] for y in a.labels] == [sorted(NAMES).index(p.parent.name) for p in a.inputs]
    r = b.ood["imagenet-r"]
    assert r.class_subset == [0, 2, 5] and r.labels.tolist() == [0, 1, 2]

    # A model that is right on the subset but puts more mass on an absent class: the full argmax is
    # wrong, the projected one right.
    logits = np.zeros((len(a), 6))
    for i, y in enumerate(a.labels):
        logits[i, a.class_subset[y]] = 2.0
        logits[i, 0] = 5.0  # class 0 (tench) is not in ImageNet-A here
    assert (logits.argmax(1) == 0).all()
    proj = project_logits(logits, a.class_subset)
    assert proj.shape == (6, 3) and (proj.argmax(1) == a.labels).all()
    t = project_logits(torch.tensor(logits, dtype=torch.float32), a.class_subset)
    assert isinstance(t, torch.Tensor) and torch.equal(t.argmax(1), torch.as_tensor(a.labels))
    assert project_logits(logits, None) is logits


def test_imagenet_shift_missing_variant(tmp_path):
    make_imagenet(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "imagenet-rendition")
    with pytest.raises(DatasetNotFoundError, match="imagenet-rendition"):
        load_dataset("imagenet-shift", root=tmp_path, shots=2)
    b = load_dataset("imagenet-shift", root=tmp_path, shots=2, skip_missing=True)
    assert set(b.ood) == {"imagenet-v2", "imagenet-sketch", "imagenet-a"}
    only_a = load_dataset("imagenet-shift", root=tmp_path, shots=2, variants=["imagenet-a"])
    assert set(only_a.ood) == {"imagenet-a"}
    with pytest.raises(ValueError, match="unknown ImageNet variants"):
        load_dataset("imagenet-shift", root=tmp_path, variants=["imagenet-c"])


def test_variant_reader_alone(tmp_path):
    make_imagenet(tmp_path)
    r = imagenet_variant("imagenet-r", root=tmp_path)
    assert r.class_subset == [0, 2, 5] and r.name == "imagenet-r"


# --------------------------------------------------------------------------------------------------
# cross-dataset transfer


def test_cross_dataset_uses_targets_own_classnames_and_templates(tmp_path):
    make_imagenet(tmp_path)
    make_coop(tmp_path, "dtd", ["banded", "woven"], n_train=(4,), n_test=3)
    make_coop(tmp_path, "eurosat", ["forest", "river", "sea lake"], n_train=(4,), n_test=2)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("cross-dataset", root=tmp_path, shots=2)  # the other eight targets are missing
    b = load_dataset("cross-dataset", root=tmp_path, shots=2, skip_missing=True)
    assert b.name == "cross-dataset" and b.info["source_dataset"] == "imagenet"
    assert set(b.ood) == {"dtd", "eurosat"} and b.info["targets"] == ["dtd", "eurosat"]
    assert b.classnames[0] == "tench" and b.templates == ["a photo of a {}."]
    assert b.train.class_counts(6).tolist() == [2] * 6
    dtd = b.ood["dtd"]
    assert dtd.classnames == ["banded", "woven"] and dtd.templates == ["{} texture."] and len(dtd) == 6
    assert b.prompts(dtd) == [["banded texture."], ["woven texture."]]
    euro = b.ood["eurosat"]
    assert b.prompts(euro)[2] == ["a centered satellite photo of sea lake."]
    assert b.prompts(b.test)[0] == ["a photo of a tench."]
    # A kind applies to every dataset; targets can be chosen.
    b7 = load_dataset("cross-dataset", root=tmp_path, shots=2, targets=["dtd"], templates="openai-7")
    assert set(b7.ood) == {"dtd"} and len(b7.ood["dtd"].templates) == 7 and len(b7.templates) == 7


def test_cross_dataset_other_source(tmp_path):
    make_coop(tmp_path, "dtd", ["banded", "woven"], n_train=(4,))
    make_coop(tmp_path, "caltech101", ["face", "leopard", "motorbike"], n_train=(4,), n_test=2)
    b = load_dataset("cross-dataset", root=tmp_path, source="dtd", targets=["caltech101"], shots=2)
    assert b.classnames == ["banded", "woven"] and b.templates == ["{} texture."]
    assert b.ood["caltech101"].classnames == ["face", "leopard", "motorbike"]
    with pytest.raises(ValueError, match="source"):
        load_dataset("cross-dataset", root=tmp_path, source="dtd", targets=["dtd"])


# --------------------------------------------------------------------------------------------------
# image folders


def test_image_folder_reader(tmp_path):
    for cls in ["zebra", "ant", "mole"]:
        for i in range(2):
            touch(tmp_path / cls / f"{i}.JPG")
    touch(tmp_path / "ant" / ".hidden.jpg")
    (tmp_path / "ant" / "notes.txt").write_text("x")
    s = image_folder(tmp_path, name="animals")
    assert s.classnames == ["ant", "mole", "zebra"]
    assert s.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(isinstance(p, Path) for p in s.inputs)
    assert [p.parent.name for p in s.inputs] == ["ant", "ant", "mole", "mole", "zebra", "zebra"]


def test_image_folder_benchmark_with_partial_ood(tmp_path):
    for part, classes, n in (
        ("train", ["cat", "dog", "red_fox"], 5),
        ("test", ["cat", "dog", "red_fox"], 2),
        ("ood/sketch", ["red_fox", "cat"], 2),
    ):
        for cls in classes:
            for i in range(n):
                Image.new("RGB", (4, 4)).save(touch(tmp_path / part / cls / f"{i}.png"))
    b = load_dataset("image-folder", root=tmp_path, shots=2, seed=1)
    assert b.classnames == ["cat", "dog", "red fox"]
    assert b.train.class_counts(3).tolist() == [2, 2, 2] and b.val.class_counts(3).tolist() == [2, 2, 2]
    assert not set(b.train.inputs) & set(b.val.inputs)
    sk = b.ood["sketch"]
    assert sk.class_subset == [0, 2] and sk.labels.tolist() == [0, 0, 1, 1]
    assert (tmp_path / "split_fewshot" / "shot_2-seed_1.json").is_file()
    (tmp_path / "ood" / "sketch" / "wolf").mkdir()
    with pytest.raises(ValueError, match="wolf"):
        load_dataset("image-folder", root=tmp_path, shots=2)


# --------------------------------------------------------------------------------------------------
# registration


VISION_NAMES = {
    "imagenet",
    "caltech101",
    "oxford-pets",
    "stanford-cars",
    "oxford-flowers",
    "food101",
    "fgvc-aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
    "imagenet-shift",
    "cross-dataset",
    "image-folder",
    "domainnet",
}


def test_registered_names():
    try:
        from saftune.data.registry import list_datasets

        names = list_datasets()
    except ModuleNotFoundError as e:  # the embedded suites may not exist yet in this tree
        if "saftune.data.embedded" not in str(e):
            raise
        import saftune.data.vision  # noqa: F401
        from saftune.data.registry import _DATASETS

        names = {n: e.help for n, e in _DATASETS.items()}
    assert VISION_NAMES <= set(names)
    assert all(names[n] for n in VISION_NAMES)


# --------------------------------------------------------------------------------------------------
# DomainNet

DN_CLASSES = ["aircraft_carrier", "cat", "the_eiffel_tower"]
DN_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]


def make_domainnet(root: Path, n_train=20, n_test=3) -> Path:
    """A fake DomainNet in its own layout: <domain>/<class>/<image> and the official-style split lists."""
    folder = root / "domainnet"
    for domain in DN_DOMAINS:
        for part, n in (("train", n_train), ("test", n_test)):
            lines = []
            for label, cls in enumerate(DN_CLASSES):
                for i in range(n):
                    rel = f"{domain}/{cls}/{domain}_{part}_{label}_{i:03d}.jpg"
                    touch(folder / rel)
                    lines.append(f"{rel} {label}")
            (folder / f"{domain}_{part}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_domainnet_few_shot_trains_on_real_and_tests_on_the_five_other_domains(tmp_path):
    folder = make_domainnet(tmp_path)
    b = load_dataset("domainnet", root=tmp_path, shots=4, seed=1)
    b.validate()
    assert b.name == "domainnet" and b.classnames == ["aircraft carrier", "cat", "the eiffel tower"]
    assert b.prompts()[0] == ["a photo of a aircraft carrier."]
    assert b.train.class_counts(3).tolist() == [4, 4, 4] and b.val.class_counts(3).tolist() == [4, 4, 4]
    assert not set(b.train.inputs) & set(b.val.inputs)
    assert all(p.parent.parent.name == "real" and "_train_" in p.name for p in b.train.inputs + b.val.inputs)
    assert all(DN_CLASSES[y] == p.parent.name for p, y in zip(b.train.inputs, b.train.labels))
    assert len(b.test) == 9 and all("real_test_" in p.name for p in b.test.inputs)
    assert list(b.ood) == ["clipart", "infograph", "painting", "quickdraw", "sketch"]
    for domain, split in b.ood.items():
        assert len(split) == 9 and all(p.name.startswith(f"{domain}_test_") for p in split.inputs)
        assert all(DN_CLASSES[y] == p.parent.name for p, y in zip(split.inputs, split.labels))
    # The same K-shot protocol as the other suites: cached per ID domain, the seed picks the sample.
    assert (folder / "real" / "split_fewshot" / "shot_4-seed_1.json").is_file()
    assert load_dataset("domainnet", root=tmp_path, shots=4, seed=1).train.inputs == b.train.inputs
    assert load_dataset("domainnet", root=tmp_path, shots=4, seed=2).train.inputs != b.train.inputs
    assert b.info["ood_domains"] == list(b.ood) and b.info["id_domain"] == "real"


def test_domainnet_full_data_and_another_id_domain(tmp_path):
    folder = make_domainnet(tmp_path)
    full = load_dataset("domainnet", root=tmp_path, shots=None)
    # the whole training list minus a held-out validation set (at most 10% of a class)
    assert full.val.class_counts(3).tolist() == [2, 2, 2] and full.train.class_counts(3).tolist() == [18, 18, 18]
    assert full.info["protocol"] == "full"
    sketch = load_dataset("domainnet", root=tmp_path, shots=2, id_domain="sketch", ood_domains=["real", "clipart"])
    assert list(sketch.ood) == ["real", "clipart"] and all("sketch_test_" in p.name for p in sketch.test.inputs)
    assert (folder / "sketch" / "split_fewshot" / "shot_2-seed_1.json").is_file()
    with pytest.raises(ValueError, match=r"ood_domains lists the ID domain 'sketch'.*remove it"):
        load_dataset("domainnet", root=tmp_path, id_domain="sketch", ood_domains=["sketch"])
    with pytest.raises(ValueError, match=r"DomainNetOptions.id_domain = 'photo' is not allowed; choose from clipart"):
        load_dataset("domainnet", root=tmp_path, id_domain="photo")


def test_domainnet_missing_files_are_named(tmp_path):
    folder = make_domainnet(tmp_path)
    (folder / "quickdraw_test.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"quickdraw_test.txt' not found; expected this layout:\n"
                                                   r"\$SAFTUNE_DATA/domainnet/"):
        load_dataset("domainnet", root=tmp_path, shots=2)
    b = load_dataset("domainnet", root=tmp_path, shots=2, skip_missing=True)
    assert list(b.ood) == ["clipart", "infograph", "painting", "sketch"]
    for rel in (folder / "real").iterdir():  # images unpacked elsewhere
        rel.rename(tmp_path / rel.name)
    with pytest.raises(DatasetNotFoundError, match=r"real_train.txt' line 1 refers to '.*real_train_0_000.jpg', "
                                                   r"which does not exist; are the images in"):
        load_dataset("domainnet", root=tmp_path, shots=2)


@pytest.mark.parametrize("file, line, text, message", [
    ("real_train.txt", 3, "real/cat/x.jpg", r"real_train.txt' line 3: expected '<domain>/<class>/<file> <label>'"),
    ("real_train.txt", 2, "real/cat/x.jpg one", r"real_train.txt' line 2: expected '<domain>/<class>/<file> <label>'"),
    ("real_train.txt", 1, "cat.jpg 0", r"real_train.txt' line 1: expected .* got 'cat.jpg 0'; use DomainNet's"),
    # the same class folder under another label, in another file than the one that named it first
    ("sketch_test.txt", 4, "sketch/cat/s.jpg 2",
     r"sketch_test.txt' line 4: class 'cat' has label 2, but label 1 in '.*real_train.txt' line 21; every list "
     r"must number the classes the same way"),
    ("real_train.txt", 25, "real/dog/d.jpg 1",
     r"real_train.txt' line 25: label 1 is class 'dog', but class 'cat' in '.*real_train.txt' line 21; one label "
     r"per class folder"),
    ("clipart_test.txt", 2, "clipart/dog/d.jpg 3",
     r"clipart_test.txt' line 2: class folder 'dog' is not in the ID training list"),
])
def test_domainnet_malformed_list_lines_name_the_file_line_and_fix(tmp_path, file, line, text, message):
    from saftune.data.vision.coop import SplitFileError

    folder = make_domainnet(tmp_path)
    lines = (folder / file).read_text().splitlines()
    lines[line - 1] = text
    (folder / file).write_text("\n".join(lines) + "\n")
    with pytest.raises(SplitFileError, match=message):
        load_dataset("domainnet", root=tmp_path, shots=2)


def test_domainnet_empty_list_missing_class_and_bad_encoding_are_refused(tmp_path):
    from saftune.data.vision.coop import SplitFileError

    folder = make_domainnet(tmp_path)
    (folder / "painting_test.txt").write_text("\n")
    with pytest.raises(SplitFileError, match=r"painting_test.txt' lists no image; use DomainNet's official"):
        load_dataset("domainnet", root=tmp_path, shots=2)
    make_domainnet(tmp_path)
    train = [ln for ln in (folder / "real_train.txt").read_text().splitlines() if not ln.endswith(" 1")]
    (folder / "real_train.txt").write_text("\n".join(train) + "\n")
    with pytest.raises(SplitFileError, match=r"real_train.txt': labels must be 0..2 with every class in the "
                                             r"training list; no line has label \[1\]"):
        load_dataset("domainnet", root=tmp_path, shots=2)
    make_domainnet(tmp_path)
    (folder / "real_test.txt").write_bytes("real/cat/caf\u00e9.jpg 1\n".encode("latin-1"))
    with pytest.raises(SplitFileError, match=r"real_test.txt' is not UTF-8 text"):
        load_dataset("domainnet", root=tmp_path, shots=2)
