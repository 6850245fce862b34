import numpy as np
import pytest
import torch

from nnclr_fast.recipe.data import (
    epoch_batches,
    load_dataset,
    load_digits_splits,
    load_image_folder,
    load_stl10,
    read_stl10_images,
    steps_per_epoch,
)


def write_stl10(root, counts=None, seed=0):
    """Tiny STL-10 in its own binary format: uint8 column-major 3x96x96 images, labels 1..10.
    Returns the images (N, 3, 96, 96) and 0-based labels it wrote, per split."""
    counts = counts or {"train": 6, "test": 4, "unlabeled": 5}
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    written = {}
    for split, n in counts.items():
        images = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        # Column-major per channel: the file stores (N, C, W, H).
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        labels = None
        if split != "unlabeled":
            labels = rng.integers(1, 11, size=n, dtype=np.uint8)
            labels.tofile(folder / f"{split}_y.bin")
            labels = labels.astype(np.int64) - 1
        written[split] = (images, labels)
    return written


def test_digits_split_is_stratified_70_30_with_random_state_0():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits_splits()
    assert (len(d.train), len(d.test)) == (1257, 540)
    assert d.train.images.shape == (1257, 1, 8, 8) and d.train.images.dtype == torch.uint8
    assert int(d.train.images.max()) == 255
    x, y = load_digits(return_X_y=True)
    _, _, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    assert d.train.labels.tolist() == y_tr.tolist() and d.test.labels.tolist() == y_te.tolist()
    # Stratified: every class keeps its share of the whole set in both parts (within one image).
    for cls in range(10):
        total = int((y == cls).sum())
        assert abs(int((d.test.labels == cls).sum()) - 0.3 * total) <= 1
    # Self-supervised training sees the training images only.
    assert d.pretrain is d.train
    assert d.num_classes == 10 and d.channels == 1


def test_stl10_binary_round_trip_through_the_real_loader(tmp_path):
    written = write_stl10(tmp_path)
    d = load_stl10(tmp_path)
    for split, loaded in (("train", d.train), ("test", d.test)):
        images, labels = written[split]
        assert loaded.images.shape == (len(images), 3, 96, 96) and loaded.images.dtype == torch.uint8
        assert torch.equal(loaded.images, torch.from_numpy(images))
        assert loaded.labels.tolist() == labels.tolist()
    unlabeled, _ = written["unlabeled"]
    assert len(d.pretrain) == len(unlabeled) + len(d.train)
    assert torch.equal(d.pretrain.images[: len(unlabeled)], torch.from_numpy(unlabeled))
    assert d.pretrain.labels[: len(unlabeled)].eq(-1).all()
    assert torch.equal(d.pretrain.labels[len(unlabeled) :], d.train.labels)
    # The stl10_binary folder itself is accepted too.
    assert torch.equal(load_stl10(tmp_path / "stl10_binary").test.images, d.test.images)


def test_stl10_is_read_column_major(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    image = np.zeros((3, 96, 96), dtype=np.uint8)
    image[0, 0, :] = 255  # the top row of the red channel
    image.transpose(0, 2, 1).tofile(folder / "one_X.bin")
    loaded = read_stl10_images(folder / "one_X.bin")
    assert loaded[0, 0, 0, :].eq(255).all() and loaded[0, 0, 1:, :].eq(0).all()


def test_stl10_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_stl10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="stl10_binary"):
        load_stl10(tmp_path)
    write_stl10(tmp_path)
    folder = tmp_path / "stl10_binary"
    (folder / "unlabeled_X.bin").unlink()
    with pytest.raises(FileNotFoundError, match="unlabeled_X.bin"):
        load_stl10(tmp_path)
    assert len(load_stl10(tmp_path, use_unlabeled=False).pretrain) == 6
    (folder / "test_X.bin").write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match="test_X.bin.*multiple"):
        load_stl10(tmp_path, use_unlabeled=False)


def test_stl10_label_problems(tmp_path):
    write_stl10(tmp_path, {"train": 3, "test": 2, "unlabeled": 1})
    folder = tmp_path / "stl10_binary"
    np.array([1, 2], dtype=np.uint8).tofile(folder / "train_y.bin")
    with pytest.raises(ValueError, match="2 labels.*3 images"):
        load_stl10(tmp_path)
    np.array([1, 11, 3], dtype=np.uint8).tofile(folder / "train_y.bin")
    with pytest.raises(ValueError, match="outside 1..10"):
        load_stl10(tmp_path)


def write_folder(root, counts, size=(12, 10)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_loads_every_class_resized_and_split(tmp_path):
    write_folder(tmp_path, {"cat": 10, "dog": 10, "eel": 20})
    d = load_image_folder(tmp_path, image_size=16)
    assert d.classes == ["cat", "dog", "eel"]
    assert len(d.train) + len(d.test) == 40 and len(d.test) == 12
    assert d.train.images.shape[1:] == (3, 16, 16) and d.train.images.dtype == torch.uint8
    assert sorted(d.test.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    same = load_dataset("folder", tmp_path, image_size=16)
    assert torch.equal(same.train.images, d.train.images)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", image_size=8)
    write_folder(tmp_path / "one", {"only": 4})
    with pytest.raises(ValueError, match="at least two class"):
        load_image_folder(tmp_path / "one", image_size=8)
    write_folder(tmp_path / "bad", {"a": 3, "b": 3})
    (tmp_path / "bad" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path / "bad", image_size=8)


def test_load_dataset_dispatch_errors():
    with pytest.raises(ValueError, match="data directory"):
        load_dataset("stl10", None)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", "x")


def test_epoch_batches_are_full_disjoint_and_seeded():
    batches = epoch_batches(103, 10, torch.Generator().manual_seed(0))
    assert len(batches) == 10 and all(len(b) == 10 for b in batches)
    flat = torch.cat(batches)
    assert len(set(flat.tolist())) == 100
    again = epoch_batches(103, 10, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_ranks_get_disjoint_shards_of_the_same_permutation():
    shards = [epoch_batches(50, 4, torch.Generator().manual_seed(1), rank=r, world_size=3) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    seen = torch.cat([torch.cat(s) for s in shards]).tolist()
    assert len(seen) == len(set(seen)) == 48


def test_batch_larger_than_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="batch size 64 is larger than the dataset \\(50 images\\)"):
        steps_per_epoch(50, 64)
    with pytest.raises(ValueError, match="32 x 2 processes"):
        steps_per_epoch(50, 32, world_size=2)
    with pytest.raises(ValueError, match="at least 2"):
        steps_per_epoch(50, 1)


def test_channel_stats_match_a_direct_computation():
    d = load_digits_splits()
    mean, std = d.channel_stats()
    x = d.train.images.double() / 255
    assert mean == pytest.approx([x.mean().item()], rel=1e-9)
    assert std == pytest.approx([x.std(correction=0).item()], rel=1e-9)
