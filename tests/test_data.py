import gzip
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ppdgm import data


def test_digits_split_is_fixed_and_disjoint():
    parts = {s: data.load_digits(s) for s in ("train", "valid", "test")}
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [1200, 300, 297]
    assert parts["train"].x.shape == (1200, 64) and parts["train"].y.shape == (1200,)
    rows = torch.cat([p.x for p in parts.values()])
    assert torch.unique(rows, dim=0).shape[0] == torch.unique(data.load_digits("all").x, dim=0).shape[0]
    assert torch.equal(data.load_digits("test").x, parts["test"].x)  # same split every call
    assert float(parts["train"].x.min()) >= 0.0 and float(parts["train"].x.max()) <= 1.0
    b = data.load_digits("train", binarize=True).x
    assert set(b.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(b, (parts["train"].x >= 0.5).float())


def test_digits_read_from_the_bundled_table_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits

    x, y = data._digits_arrays()
    bunch = load_digits()
    assert np.array_equal(x, bunch.data.astype(np.float32) / 16.0) and np.array_equal(y, bunch.target)
    assert x.dtype == np.float32 and y.dtype == np.int64


@pytest.mark.parametrize("name", sorted(data.TOYS))
def test_toys_are_seeded(name):
    a, b, c = data.TOYS[name](n=300, seed=1), data.TOYS[name](n=300, seed=1), data.TOYS[name](n=300, seed=2)
    assert a.shape == (300, 2) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_gaussian_mixture_points_sit_near_their_centres():
    x, centres = data.make_gaussian_mixture(2000, modes=8, sd=0.05, seed=0)
    d = torch.cdist(x, centres).min(1).values
    assert d.max() < 0.3 and centres.shape == (8, 2)


def write_idx(path, arr, code=0x08, gz=False):
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    dtype = {0x08: np.uint8, 0x0D: ">f4"}[code]
    payload = header + np.asarray(arr, dtype=dtype).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)


def test_idx_reader_and_mnist_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    assert np.array_equal(data.read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    ds = data.load_mnist(tmp_path, "train")
    assert ds.x.shape == (5, 12) and ds.image_shape == (4, 3)
    assert torch.allclose(ds.x[0], torch.tensor(images[0].reshape(-1) / 255.0, dtype=torch.float32))
    assert ds.y.tolist() == [3, 1, 4, 1, 5]
    floats = rng.standard_normal((2, 3)).astype(np.float32)
    write_idx(tmp_path / "f-idx2-ubyte", floats, code=0x0D)
    assert np.allclose(data.read_idx(tmp_path / "f-idx2-ubyte"), floats)


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path / "a-idx1-ubyte", np.arange(10, dtype=np.uint8))
    raw = (tmp_path / "a-idx1-ubyte").read_bytes()
    (tmp_path / "t-idx1-ubyte").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="header says shape"):
        data.read_idx(tmp_path / "t-idx1-ubyte")
    (tmp_path / "png-idx1-ubyte").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="expected an IDX file"):
        data.read_idx(tmp_path / "png-idx1-ubyte")


def test_npy_and_csv_readers(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "a.npy", arr)
    np.savetxt(tmp_path / "a.csv", arr, delimiter=",", header="a,b,c", comments="")
    np.savetxt(tmp_path / "b.csv", arr, delimiter=",")
    for name in ("a.npy", "a.csv", "b.csv"):
        assert torch.equal(data.read_array(tmp_path / name), torch.from_numpy(arr))
    assert data.load_dataset(str(tmp_path / "a.npy")).x.shape == (4, 3)


@pytest.mark.parametrize(
    "x, support, rank, match",
    [
        (torch.tensor([[0.0, float("nan")]]), "real", None, "finite"),
        (torch.tensor([[0.0, float("inf")]]), "real", None, "finite"),
        (torch.zeros(0, 3), "real", None, "non-empty"),
        (torch.zeros(3), "real", 2, "rank-2"),
        (torch.tensor([[0.0, 0.5]]), "binary", None, "binary"),
        (torch.tensor([[0.0, 1.5]]), "unit_interval", None, r"\[0, 1\]"),
        (torch.tensor([[-1.0, 2.0]]), "counts", None, "counts"),
        (torch.tensor([[0.5, 2.0]]), "counts", None, "counts"),
    ],
)
def test_check_data_says_what_was_expected(x, support, rank, match):
    with pytest.raises(ValueError, match=match) as err:
        data.check_data(x, "pixels", support=support, rank=rank)
    assert "pixels" in str(err.value)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=20))
def test_check_data_accepts_exactly_the_finite_arrays(values):
    x = torch.tensor(values, dtype=torch.float32)
    if torch.isfinite(x).all():
        assert torch.equal(data.check_data(x), x)
    else:
        with pytest.raises(ValueError, match="finite"):
            data.check_data(x)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="data must be one of"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_digits("validation")


def test_sunspots_splits_by_time_into_contiguous_parts():
    from ppdgm.data import load_dataset

    parts = [load_dataset("sunspots", split) for split in ("train", "valid", "test")]
    whole = load_dataset("sunspots", "all").x
    assert torch.equal(torch.cat([p.x for p in parts]), whole)
    assert len(whole) == 309 and all(len(p.x) >= 48 for p in parts)  # each split holds a default DeepAR window
