"""Data: checked loading of user files, ground-truth splits, and splitting a user's file."""

from __future__ import annotations

import contextlib
import io
import math
import pathlib
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from mapa_vae.cli import main
from mapa_vae.config import TrainConfig
from mapa_vae.data.dataset import make_ground_truth_data
from mapa_vae.data.files import check_array, load_array
from mapa_vae.data.groundtruth import circle
from mapa_vae.data.loading import load_dataset
from mapa_vae.errors import MapaError
from mapa_vae.training.loop import train

GOOD = np.arange(12, dtype=np.float64).reshape(6, 2) / 10


class _Explodes:
    """Unpickling this creates ``marker``: proof that a loader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _npy(a: np.ndarray, name: str = "data.npy") -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / name
        np.save(path, a)
        return path

    return write


def _text(content: str, name: str = "data.csv") -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / name
        path.write_text(content)
        return path

    return write


def _with(value: float, row: int, col: int) -> np.ndarray:
    a = GOOD.copy()
    a[row, col] = value
    return a


def _object_npy(tmp: Path) -> Path:
    path = tmp / "objects.npy"
    a = np.empty((3, 2), dtype=object)
    a[:] = 1.0
    a[0, 0] = _Explodes(tmp / "pwned")
    np.save(path, a, allow_pickle=True)
    return path


def _missing(tmp: Path) -> Path:
    return tmp / "no-such-file.npy"


def _bytes(content: bytes, name: str) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(content)
        return path

    return write


def _pickle_as_npy(tmp: Path) -> Path:
    path = tmp / "pickled.npy"
    path.write_bytes(pickle.dumps(_Explodes(tmp / "pwned")))
    return path


def _truncated_npy(tmp: Path) -> Path:
    buffer = io.BytesIO()
    np.save(buffer, np.ones((100, 3)))
    path = tmp / "truncated.npy"
    path.write_bytes(buffer.getvalue()[:200])
    return path


# (id, writer, expected_dim, fragments the message must contain besides the path)
BAD_INPUTS = [
    ("nan-npy", _npy(_with(np.nan, 3, 1)), None, ["row 3", "column 1"]),
    ("posinf-npy", _npy(_with(np.inf, 2, 0)), None, ["row 2", "column 0"]),
    ("neginf-npy", _npy(_with(-np.inf, 5, 1)), None, ["row 5", "column 1"]),
    # CSV rows and columns are counted as a spreadsheet does: from 1, the header is row 1
    ("nan-csv", _text("a,b\n1,2\n3,4\n5,nan\n"), None, ["row 4", "column 2"]),
    ("posinf-csv", _text("1,2\ninf,4\n"), None, ["row 2", "column 1"]),
    ("neginf-csv", _text("1,2\n3,4\n5,6\n7,-inf\n"), None, ["row 4", "column 2"]),
    ("empty-npy", _text("", "empty.npy"), None, ["empty"]),
    ("empty-csv", _text("", "empty.csv"), None, ["empty"]),
    ("header-only-csv", _text("x,y\n"), None, ["header"]),
    ("zero-columns", _npy(np.zeros((5, 0))), None, ["zero columns"]),
    ("one-row", _npy(np.zeros((1, 2))), None, ["1 row"]),
    ("one-d", _npy(np.zeros(5)), None, ["2-D", "(5,)"]),
    ("three-d", _npy(np.zeros((4, 3, 2))), None, ["2-D", "(4, 3, 2)"]),
    ("string-cell-csv", _text("x,y\n1,2\n3,4\n5,abc\n7,8\n"), None, ["row 4", "column 2", "abc"]),
    ("ragged-csv", _text("1,2\n3,4\n5,6,7\n8,9\n"), None, ["row 3", "3 columns"]),
    ("object-npy", _object_npy, None, ["object"]),
    ("txt-extension", _text("1,2\n3,4\n", "data.txt"), None, [".txt"]),
    ("missing-file", _missing, None, ["not found"]),
    ("wrong-dim", _npy(GOOD), 3, ["2 features", "expects 3"]),
    # a file that is not what its name says, or not text at all
    ("pickle-as-npy", _pickle_as_npy, None, ["not a .npy file"]),
    ("text-as-npy", _text("1,2\n3,4\n", "text.npy"), None, ["not a .npy file"]),
    ("truncated-npy", _truncated_npy, None, ["not a valid .npy file"]),
    ("non-utf8-csv", _bytes("h\xe9ight,w\n1,2\n3,4\n".encode("latin-1"), "latin.csv"), None, ["UTF-8"]),
    ("binary-csv", _bytes(b"\xff\xfe\x00\x01\x02", "binary.csv"), None, ["UTF-8"]),
    ("huge-field-csv", _text("1,2\n3," + "4" * 200_000 + "\n"), None, ["row 2", "CSV"]),
    ("string-dtype-npy", _npy(np.array([["a", "b"], ["c", "d"]])), None, ["numeric", "<U1"]),
    ("complex-npy", _npy(GOOD.astype(complex)), None, ["complex"]),
    # finite in float64 but not in float32, the precision models train in
    ("float32-overflow-npy", _npy(_with(1e39, 4, 1)), None, ["row 4", "column 1", "float32"]),
    ("float32-overflow-csv", _text("a,b\n1,2\n3,-1e39\n"), None, ["row 3", "column 2", "float32"]),
]


@pytest.mark.parametrize(
    ("write", "expected_dim", "fragments"),
    [pytest.param(w, d, f, id=i) for i, w, d, f in BAD_INPUTS],
)
def test_bad_input_is_one_line_error_naming_file(tmp_path, write, expected_dim, fragments):
    path = write(tmp_path)
    with pytest.raises(MapaError) as info:
        load_array(path, expected_dim=expected_dim)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled
    assert isinstance(info.value, ValueError)


def test_object_npy_is_refused_without_unpickling(tmp_path):
    # the file really does run code when unpickled: the refusal above is what protects us
    path = _object_npy(tmp_path)
    np.load(path, allow_pickle=True)
    assert (tmp_path / "pwned").exists()
    (tmp_path / "pwned").unlink()
    with pytest.raises(MapaError, match="object"):
        load_array(path)
    assert not (tmp_path / "pwned").exists()


# --- the same bad files through the training API and the CLI ------------------------------------


def _binary_with(value: float, row: int, col: int) -> np.ndarray:
    a = (np.random.default_rng(0).random((50, 3)) < 0.5).astype(np.float64)
    a[row, col] = value
    return a


def _gaussian_rows(n: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 2))


# What the loader reports for a bad file is what training reports; a missing file is "neither a
# built-in data set nor a .npy/.csv file" to training, an existing one of another type unsupported.
_AS_SOURCE = {"txt-extension": ["unsupported file type '.txt'"], "missing-file": ["neither a built-in"]}
# (id, writer, TrainConfig overrides, fragments, whether the message names the file)
TRAIN_INPUTS = [
    (i, w, {}, _AS_SOURCE.get(i, f), True) for i, w, d, f in BAD_INPUTS if d is None
] + [
    ("bernoulli-outside-0-1", _npy(_binary_with(2.0, 37, 2)), {"likelihood": "bernoulli"},
     ["row 37", "column 2", "[0, 1]"], True),  # the file's row, not a row of a shuffled split
    ("bernoulli-negative", _npy(_binary_with(-0.5, 3, 0)), {"likelihood": "continuous-bernoulli"},
     ["row 3", "column 0", "[0, 1]"], True),
    ("too-few-rows-to-split", _npy(_gaussian_rows(9)), {}, ["9 rows"], True),
    ("gaussian-needs-noise-var", _npy(_gaussian_rows(50)), {"noise_var": None}, ["--noise-var"], True),
    ("k-plus-S-at-least-N", _npy(_gaussian_rows(50)), {"samples": 40},
     ["k + S = 44", "N - 1 = 39"], False),  # 40 training points
]


def _train_config(path: Path, tmp: Path, **overrides) -> TrainConfig:
    fields = {"data": str(path), "method": "mapa", "noise_var": 0.01, "samples": 5, "epochs": 1,
              "hidden": (8,), "eval_every": 1, "val_grid": 256, "test_grid": 256,
              "cache_dir": str(tmp / "cache"), **overrides}
    return TrainConfig(**fields)


@pytest.mark.parametrize(
    ("write", "overrides", "fragments", "names_file"),
    [pytest.param(w, o, f, n, id=i) for i, w, o, f, n in TRAIN_INPUTS],
)
def test_bad_input_through_training_api(tmp_path, write, overrides, fragments, names_file):
    path = write(tmp_path)
    with pytest.raises(MapaError) as info:
        train(_train_config(path, tmp_path, **overrides), tmp_path / "run", progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert (str(path) in message) == names_file, message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "pwned").exists()
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir())  # nothing half-done is left behind


@pytest.mark.parametrize(
    ("write", "overrides", "fragments", "names_file"),
    [pytest.param(w, o, f, n, id=i) for i, w, o, f, n in TRAIN_INPUTS],
)
def test_bad_input_through_cli(tmp_path, write, overrides, fragments, names_file):
    path = write(tmp_path)
    cfg = _train_config(path, tmp_path, **overrides)
    argv = ["train", "--data", str(path), "--method", cfg.method, "--samples", str(cfg.samples),
            "--epochs", "1", "--hidden", "8", "--likelihood", cfg.likelihood or "gaussian",
            "--cache-dir", cfg.cache_dir or "", "--out", str(tmp_path / "run"), "--quiet"]
    if cfg.noise_var is not None:
        argv += ["--noise-var", str(cfg.noise_var)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv) == 2
    line = err.getvalue()
    assert line.startswith("mapa-vae: error: ") and line.count("\n") == 1, line
    assert "Traceback" not in line and out.getvalue() == ""
    assert (str(path) in line) == names_file, line
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "pwned").exists()


def test_csv_byte_order_mark_keeps_the_first_row(tmp_path):
    """Excel writes UTF-8 with a BOM: the first data row must not be mistaken for a header."""
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeff1,2\r\n3,4\r\n5,6\r\n".encode())
    np.testing.assert_array_equal(load_array(path), [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    path.write_bytes("\ufeffx,y\r\n3,4\r\n5,6\r\n".encode())
    np.testing.assert_array_equal(load_array(path), [[3.0, 4.0], [5.0, 6.0]])


def test_boolean_npy_becomes_float64(tmp_path):
    np.save(tmp_path / "bits.npy", np.array([[True, False], [False, True]]))
    out = load_array(tmp_path / "bits.npy")
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [[1.0, 0.0], [0.0, 1.0]])


def test_integer_npy_becomes_float64(tmp_path):
    a = np.arange(10, dtype=np.int32).reshape(5, 2)
    np.save(tmp_path / "ints.npy", a)
    out = load_array(tmp_path / "ints.npy", expected_dim=2)
    assert out.dtype == np.float64
    assert out.shape == (5, 2)
    np.testing.assert_array_equal(out, a.astype(np.float64))


def test_csv_with_header_of_names(tmp_path):
    path = tmp_path / "named.csv"
    path.write_text("height, weight\n1.5,2\n-3,4e-1\n\n5,  6\n")
    out = load_array(path)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [[1.5, 2.0], [-3.0, 0.4], [5.0, 6.0]])


def test_csv_without_header_keeps_first_row(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("1,2\n3,4\n")
    np.testing.assert_array_equal(load_array(path), [[1.0, 2.0], [3.0, 4.0]])


def test_read_only_memmap_is_accepted_and_copied(tmp_path):
    np.save(tmp_path / "m.npy", GOOD)
    mm = np.load(tmp_path / "m.npy", mmap_mode="r")
    assert not mm.flags.writeable
    out = check_array(mm, "m.npy", expected_dim=2)
    assert out.flags.writeable
    assert out.dtype == np.float64
    assert not np.shares_memory(out, mm)
    out[0, 0] = 99.0  # writing to the result must not touch the file
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), GOOD)


def test_fortran_order_is_accepted(tmp_path):
    f = np.asfortranarray(GOOD)
    assert f.flags.f_contiguous and not f.flags.c_contiguous
    out = check_array(f, "f")
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, GOOD)
    np.save(tmp_path / "f.npy", f)
    np.testing.assert_array_equal(load_array(tmp_path / "f.npy"), GOOD)


# --- built-in ground-truth data (analytic circle: no surrogate needed) ---------------------------


def test_ground_truth_splits_have_requested_shapes():
    ds = make_ground_truth_data("circle", n_train=30, n_val=20, n_test=10, seed=0, surrogate=False)
    for x, z, n in ((ds.train, ds.z_train, 30), (ds.val, ds.z_val, 20), (ds.test, ds.z_test, 10)):
        assert x.dtype == torch.float64 and x.shape == (n, 2)
        assert z is not None and z.dtype == torch.float64 and z.shape == (n, 1)
    assert ds.dim == 2
    assert ds.name == "circle"
    assert ds.truth is not None and ds.truth.noise_var == 0.01


def test_ground_truth_same_seed_same_data_other_seed_other_data():
    a = make_ground_truth_data("circle", 50, 20, 20, seed=3, surrogate=False)
    b = make_ground_truth_data("circle", 50, 20, 20, seed=3, surrogate=False)
    c = make_ground_truth_data("circle", 50, 20, 20, seed=4, surrogate=False)
    for split in ("train", "val", "test", "z_train", "z_val", "z_test"):
        assert torch.equal(getattr(a, split), getattr(b, split))
        assert not torch.equal(getattr(a, split), getattr(c, split))
    # the splits are distinct draws, not copies of one another
    assert not torch.equal(a.train[:20], a.val)


def test_unknown_ground_truth_lists_valid_names():
    with pytest.raises(MapaError) as info:
        make_ground_truth_data("squiggle", 10, 10, 10, seed=0, surrogate=False)
    message = str(info.value)
    assert "squiggle" in message
    assert "figure-8, circle, absolute-value, clusters, spiral-dots" in message
    assert "\n" not in message


def test_circle_samples_follow_the_model():
    n = 5000
    ds = make_ground_truth_data("circle", n, 10, 10, seed=0, surrogate=False)
    assert ds.z_train is not None
    z = ds.z_train[:, 0]
    # z ~ N(0, 1)
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert abs(float(z.var()) - 1.0) < 0.1
    # x = [cos 2πΦ(z), sin 2πΦ(z)] + N(0, 0.01 I), written out here independently of the package
    phi = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    f = torch.stack([torch.cos(2 * math.pi * phi), torch.sin(2 * math.pi * phi)], -1)
    torch.testing.assert_close(f, circle(z), rtol=0, atol=1e-12)
    resid = ds.train - f
    var = resid.var(0)
    assert var.shape == (2,)
    assert torch.all((var - 0.01).abs() < 0.001), var
    assert torch.all(resid.mean(0).abs() < 4 * math.sqrt(0.01 / n))
    # the two noise coordinates are uncorrelated
    corr = torch.corrcoef(resid.T)[0, 1]
    assert abs(float(corr)) < 4 / math.sqrt(n)


# --- a user's file, split 80 / 10 / 10 ------------------------------------------------------------


def _rows(t: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(r) for r in t.tolist())


def test_file_split_80_10_10_disjoint_and_complete(tmp_path):
    a = np.stack([np.arange(100.0), np.arange(100.0) ** 2], 1)  # every row unique
    np.save(tmp_path / "pts.npy", a)
    ds = load_dataset(str(tmp_path / "pts.npy"), seed=1)
    assert ds.train.shape == (80, 2) and ds.val.shape == (10, 2) and ds.test.shape == (10, 2)
    assert ds.train.dtype == torch.float64
    assert ds.truth is None and ds.z_train is None
    assert ds.name == "pts"
    tr, va, te = set(_rows(ds.train)), set(_rows(ds.val)), set(_rows(ds.test))
    assert not (tr & va) and not (tr & te) and not (va & te)
    together = torch.cat([ds.train, ds.val, ds.test])
    assert _rows(together) == _rows(torch.from_numpy(a))
    # shuffled, reproducibly from the seed
    again = load_dataset(str(tmp_path / "pts.npy"), seed=1)
    other = load_dataset(str(tmp_path / "pts.npy"), seed=2)
    assert torch.equal(ds.train, again.train)
    assert not torch.equal(ds.train, other.train)
    assert not torch.equal(ds.train, torch.from_numpy(a[:80]))


def test_file_with_too_few_rows(tmp_path):
    np.save(tmp_path / "small.npy", GOOD[:5].repeat(2, 0)[:9])
    with pytest.raises(MapaError, match="9 rows"):
        load_dataset(str(tmp_path / "small.npy"))


def test_bogus_source_is_refused(tmp_path):
    with pytest.raises(MapaError) as info:
        load_dataset(str(tmp_path / "nothing-here.npy"))
    assert "circle" in str(info.value)  # lists the built-in names
    with pytest.raises(MapaError):
        load_dataset("not-a-data-set")
