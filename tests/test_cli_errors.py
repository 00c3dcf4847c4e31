"""Every edge a user can reach from the command line ends in one line, never a traceback.

One parametrized test runs each case of issue 9 through :func:`mapa_vae.cli.main` in-process:
bad flag values, hand-edited ``config.json`` files, posterior caches edited with a recomputed
digest, misleading messages, output paths that cannot be written. A user error exits with
status 2 and a system error (disk full) with status 1, each as exactly one
``mapa-vae: error: …`` line naming the flag, key or file; an edited cache is rebuilt with a
one-line notice naming it. The run directories the cases need are trained once per module.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import mapa_vae.inference.cache as cache_module
import mapa_vae.storage as storage_module
from mapa_vae.cli import build_parser, main
from mapa_vae.inference.cache import _arrays_digest

TINY = ["--epochs", "1", "--hidden", "8", "--n-train", "60", "--n-val", "20", "--n-test", "20",
        "--samples", "5", "--val-grid", "64", "--test-grid", "64", "--prior-steps", "5",
        "--code-prior-steps", "5", "--quiet"]


@dataclass
class Env:
    root: Path
    points: Path  # 300 points of the circle, .npy
    run: Path  # MAPA on the circle, latent 1
    run5: Path  # VAE on the circle, latent 5
    cache: Path  # the posterior cache the MAPA run wrote
    tmp: Path = field(default_factory=Path)  # this case's own folder
    before: dict[Path, int] = field(default_factory=dict)  # files' mtimes before a second command

    def train(self, *extra: str, cache: Path | None = None, out: str = "out") -> list[str]:
        """The tiny MAPA run on the circle, into this case's folder."""
        return ["train", "--data", "circle", *TINY, "--cache-dir", str(cache or self.tmp / "cache"),
                "--out", str(self.tmp / out), *extra]

    def edited_run(self, edit: Callable[[dict], object]) -> Path:
        """A copy of the MAPA run whose config.json is replaced by ``edit(config)``."""
        run = self.tmp / "run"
        shutil.copytree(self.run, run)
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps(edit(cfg)))
        return run

    def edited_cache(self, edit: Callable[[dict[str, np.ndarray]], None]) -> tuple[Path, Path]:
        """A copy of the cache whose posterior arrays are edited and their digest recomputed (the
        digest is unkeyed: it proves integrity, not origin)."""
        cache = self.tmp / "cache"
        shutil.copytree(self.cache, cache)
        (path,) = cache.glob("posterior-*.npz")
        with np.load(path) as f:
            meta = bytes(f["meta"]).decode()
            arrays = {k: f[k] for k in ("log_q", "index", "log_rest")}
        edit(arrays)
        key = meta.partition(":")[0]
        new_meta = np.frombuffer((key + ":" + _arrays_digest(arrays)).encode(), dtype=np.uint8)
        with path.open("wb") as fh:
            np.savez(fh, meta=new_meta, **arrays)
        return cache, path


def _call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("cli-errors")
    points, cache = root / "circle.npy", root / "cache"
    assert _call(["data", "circle", "--n", "300", "--out", str(points)])[0] == 0
    e = Env(root, points, root / "run", root / "run5", cache, tmp=root)
    code, _, err = _call(e.train(cache=cache, out="run"))
    assert code == 0, err
    code, _, err = _call(["train", "--data", "circle", *TINY, "--method", "vae", "--latent-dim", "5",
                          "--out", str(e.run5)])
    assert code == 0, err
    return e


@dataclass
class Case:
    argv: Callable[[Env], list[str]]
    names: tuple[str, ...]  # what the line must name (flag, key, file), "{tmp}" is the case folder
    code: int = 2
    check: Callable[[Env], None] | None = None  # anything else to verify afterwards


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _csv(env: Env, name: str, sep: str) -> Path:
    x = np.load(env.points)[:50]
    return _write(env.tmp / name, "".join(f"{a:.6f}{sep}{b:.6f}\n" for a, b in x))


def _truncated_config(env: Env) -> Path:
    run = env.edited_run(lambda c: c)
    _write(run / "config.json", '{\n"data": "circ')  # json: "Unterminated string starting at"
    return run


def _set_index(value: float | int) -> Callable[[dict[str, np.ndarray]], None]:
    def edit(a: dict[str, np.ndarray]) -> None:
        a["index"][3, 2] = value
    return edit


def _nan(a: dict[str, np.ndarray]) -> None:
    a["log_q"][4, 1] = np.nan


def _floats(a: dict[str, np.ndarray]) -> None:
    a["index"] = a["index"].astype(np.float64)


def _five(a: dict[str, np.ndarray]) -> None:
    a["log_q"], a["index"], a["log_rest"] = a["log_q"][:5, :5], a["index"][:5, :5], a["log_rest"][:5]


def _cache_case(edit: Callable[[dict[str, np.ndarray]], None]) -> Case:
    """The run's own posterior cache, edited: rebuilt with a notice, and the run succeeds."""

    def argv(env: Env) -> list[str]:
        cache, _ = env.edited_cache(edit)
        return env.train(cache=cache)

    def check(env: Env) -> None:
        (path,) = (env.tmp / "cache").glob("posterior-*.npz")
        with np.load(path) as f:
            index = f["index"]
        assert index.dtype == np.int64 and index.shape == (60, 60)
        assert index.min() >= 0 and index.max() < 60
        assert (env.tmp / "out" / "metrics.json").exists()

    return Case(argv, ("posterior-", "rebuil"), code=0, check=check)


def _no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(storage_module.os, "fsync", fsync)


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    class ReadOnlyLock:  # what FileLock meets on a read-only file system
        def __init__(self, path: str) -> None:
            self.path = path

        def acquire(self) -> None:
            raise OSError(errno.EROFS, "Read-only file system", self.path)

        def release(self) -> None:
            return None

    monkeypatch.setattr(cache_module, "FileLock", ReadOnlyLock)


def _trained_with(likelihood: str) -> Callable[[Env], None]:
    def check(env: Env) -> None:
        cfg = json.loads((env.tmp / "out" / "config.json").read_text())
        assert cfg["likelihood_config"]["name"] == likelihood
    return check


def _compared(env: Env) -> None:
    cfg = json.loads((env.tmp / "cmp" / "vae" / "config.json").read_text())
    assert cfg["noise_var"] == 0.01 and cfg["hidden"] == [8]


def _nothing_written(env: Env) -> None:
    assert not (env.tmp / "out" / "config.json").exists()


CASES: dict[str, Case] = {
    # --- values that used to end in a traceback
    "iwae-samples-0": Case(lambda e: e.train("--method", "iwae", "--samples", "0"), ("--samples",)),
    "lr-nan": Case(lambda e: e.train("--lr", "nan"), ("--lr",)),
    "lr-negative": Case(lambda e: e.train("--lr", "-1"), ("--lr",)),
    "rho-1.5": Case(lambda e: e.train("--rho", "1.5"), ("--rho",)),
    "data-n-negative": Case(lambda e: ["data", "circle", "--n", "-5", "--out", str(e.tmp / "x.npy")],
                            ("--n",)),
    "sample-n-negative": Case(lambda e: ["sample", str(e.run), "--n", "-3", "--out", str(e.tmp / "x.npy")],
                              ("--n",)),
    "evaluate-grid-0": Case(lambda e: ["evaluate", str(e.run), "--data", str(e.points), "--grid", "0"],
                            ("--grid",)),
    "evaluate-grid-negative": Case(lambda e: ["evaluate", str(e.run), "--data", str(e.points),
                                              "--grid", "-4"], ("--grid",)),
    "evaluate-samples-0": Case(lambda e: ["evaluate", str(e.run5), "--data", str(e.points),
                                          "--samples", "0"], ("--samples",)),
    "evaluate-samples-negative": Case(lambda e: ["evaluate", str(e.run5), "--data", str(e.points),
                                                 "--samples", "-1"], ("--samples",)),
    "reproduce-jobs-0": Case(lambda e: ["reproduce", "--jobs", "0", "--out", str(e.tmp / "r")], ("--jobs",)),
    "n-train-0": Case(lambda e: e.train("--n-train", "0"), ("--n-train",), check=_nothing_written),
    "n-train-negative": Case(lambda e: e.train("--n-train", "-5"), ("--n-train",)),
    "n-val-0": Case(lambda e: e.train("--n-val", "0"), ("--n-val",), check=_nothing_written),
    "n-test-0": Case(lambda e: e.train("--n-test", "0"), ("--n-test",), check=_nothing_written),
    # --- a run's config.json edited by hand (read by `sample`)
    **{f"config-{key}-{value}": Case(
        lambda e, key=key, value=value: ["sample", str(e.edited_run(lambda c: {**c, key: value})),
                                         "--n", "5", "--out", str(e.tmp / "x.npy")],
        ("config.json", key))
       for key, value in [("epochs", "ten"), ("latent_dim", "two"), ("hidden", 5),
                          ("noise_var", "abc"), ("data_dim", 7), ("data_dim", "seven")]},
    "config-null": Case(lambda e: ["sample", str(e.edited_run(lambda c: None)), "--n", "5",
                                   "--out", str(e.tmp / "x.npy")], ("config.json",)),
    "config-list": Case(lambda e: ["sample", str(e.edited_run(lambda c: [c])), "--n", "5",
                                   "--out", str(e.tmp / "x.npy")], ("config.json",)),
    "config-truncated": Case(lambda e: ["sample", str(_truncated_config(e)), "--n", "5",
                                        "--out", str(e.tmp / "x.npy")], ("config.json", "line 2")),
    # --- a posterior cache edited with its digest recomputed: rebuilt with a notice
    "cache-index-out-of-range": _cache_case(_set_index(60)),
    "cache-index-negative": _cache_case(_set_index(-1)),
    "cache-nan": _cache_case(_nan),
    "cache-float-index": _cache_case(_floats),
    "cache-5x5": _cache_case(_five),
    # --- messages that misled
    "digits-binary-default-likelihood": Case(
        lambda e: ["train", "--data", "digits-binary", "--method", "vae", "--epochs", "1", "--hidden", "8",
                   "--samples", "1", "--test-grid", "64", "--val-grid", "64", "--quiet",
                   "--out", str(e.tmp / "out")], (), code=0, check=_trained_with("bernoulli")),
    "compare-takes-train-flags": Case(
        lambda e: ["compare", "--data", str(e.points), "--noise-var", "0.01", "--methods", "vae",
                   *TINY, "--out", str(e.tmp / "cmp")], (), code=0, check=_compared),
    "txt-file": Case(lambda e: e.train("--data", str(_write(e.tmp / "points.txt", "1 2\n3 4\n"))),
                     ("points.txt", "unsupported", ".txt")),
    "upper-case-npy": Case(lambda e: ["evaluate", str(e.run), "--data",
                                      str(shutil.copy(e.points, e.tmp / "UPPER.NPY"))], (), code=0),
    "upper-case-npy-train": Case(lambda e: e.train("--data", str(shutil.copy(e.points, e.tmp / "P.NPY")),
                                                   "--method", "vae", "--noise-var", "0.01"), (), code=0),
    "semicolon-csv": Case(lambda e: ["evaluate", str(e.run), "--data", str(_csv(e, "semi.csv", ";"))],
                          (), code=0),
    "tab-csv": Case(lambda e: ["evaluate", str(e.run), "--data", str(_csv(e, "tab.csv", "\t"))],
                    (), code=0),
    "decimal-comma-csv": Case(lambda e: ["evaluate", str(e.run), "--data",
                                         str(_write(e.tmp / "eu.csv", "1,08;0,03\n0,5;0,2\n"))],
                              ("eu.csv", "decimal")),
    "disk-full": Case(lambda e: ["data", "circle", "--n", "10", "--out", str(e.tmp / "full.npy")],
                      ("full.npy", "No space left"), code=1),
    "cache-dir-read-only": Case(lambda e: e.train(), ("--cache-dir", "Read-only")),
    "cache-dir-under-a-file": Case(lambda e: e.train(cache=_write(e.tmp / "f", "") / "cache"),
                                   ("--cache-dir",)),
    "hidden-0": Case(lambda e: e.train("--hidden", "0"), ("--hidden",)),
    "data-n-0": Case(lambda e: ["data", "circle", "--n", "0", "--out", str(e.tmp / "x.npy")], ("--n",),
                     check=lambda e: None if not (e.tmp / "x.npy").exists() else pytest.fail("wrote")),
    "sample-n-0": Case(lambda e: ["sample", str(e.run), "--n", "0", "--out", str(e.tmp / "x.npy")],
                       ("--n",)),
    "out-is-a-file": Case(lambda e: ["train", "--data", "circle", *TINY,
                                     "--out", str(_write(e.tmp / "taken", ""))], ("--out", "taken")),
    "compare-out-is-a-file": Case(lambda e: ["compare", "--data", "circle", *TINY,
                                             "--out", str(_write(e.tmp / "taken", ""))], ("--out", "taken")),
}


# --- every edge a user reaches, round three: seeds, sizes, outputs, strict CSV, compare's folder,
# reproduce's checks before its pilot runs (each case failed before: a traceback, a silent exit 0
# or a replaced result)
HUGE_SEED = "1180591620717411303424"  # 2**70


def _absent(*names: str) -> Callable[[Env], None]:
    def check(env: Env) -> None:
        for name in names:
            assert not (env.tmp / name).exists(), name
    return check


def _wrote(name: str, rows: int) -> Callable[[Env], None]:
    def check(env: Env) -> None:
        assert np.load(env.tmp / name).shape[0] == rows
    return check


def _compared_once(env: Env, *methods: str) -> None:
    """A finished comparison in the case folder's ``cmp``."""
    code, _, err = _call(_compare_argv(env, *methods))
    assert code == 0, err


def _compare_argv(env: Env, *methods: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["compare", "--data", "circle", *TINY, "--methods", *(methods or ("vae",)),
            "--cache-dir", str(env.tmp / "cache"), "--out", str(env.tmp / "cmp"), *extra]


def _second_compare(*extra: str, first: tuple[str, ...] = ("vae",),
                    then: tuple[str, ...] = ("vae",)) -> Callable[[Env], list[str]]:
    def argv(env: Env) -> list[str]:
        _compared_once(env, *first)
        env.before = {p: p.stat().st_mtime_ns for p in (env.tmp / "cmp").rglob("*") if p.is_file()}
        return _compare_argv(env, *then, extra=extra)
    return argv


def _nothing_replaced(env: Env) -> None:
    after = {p: p.stat().st_mtime_ns for p in (env.tmp / "cmp").rglob("*") if p.is_file()}
    assert after == env.before


def _runs_reused(env: Env) -> None:
    after = {p: p.stat().st_mtime_ns for p in (env.tmp / "cmp").rglob("*") if p.is_file()}
    runs = [p for p in env.before if p.parent.name == "vae"]
    assert runs and all(after[p] == env.before[p] for p in runs)  # the run itself was not trained again


def _trained_on(rows: int) -> Callable[[Env], None]:
    def check(env: Env) -> None:
        assert json.loads((env.tmp / "out" / "metrics.json").read_text())["n_train"] == rows
    return check


ROUND_THREE: dict[str, Case] = {
    "train-seed-negative": Case(lambda e: e.train("--seed", "-1"), ("--seed",), check=_nothing_written),
    "train-data-seed-negative": Case(lambda e: e.train("--data-seed", "-1"), ("--data-seed",),
                                     check=_nothing_written),
    "train-data-seed-huge": Case(lambda e: e.train("--data-seed", HUGE_SEED, "--method", "vae"), (),
                                 code=0),
    "data-seed-negative": Case(lambda e: ["data", "circle", "--seed", "-1", "--out", str(e.tmp / "x.npy")],
                               ("--seed",), check=_absent("x.npy")),
    "data-seed-huge": Case(lambda e: ["data", "circle", "--n", "7", "--seed", HUGE_SEED,
                                      "--out", str(e.tmp / "x.npy")], (), code=0, check=_wrote("x.npy", 7)),
    "sample-seed-negative": Case(lambda e: ["sample", str(e.run), "--seed", "-1", "--out",
                                            str(e.tmp / "x.npy")], ("--seed",), check=_absent("x.npy")),
    "sample-seed-huge": Case(lambda e: ["sample", str(e.run), "--n", "5", "--seed", HUGE_SEED, "--out",
                                        str(e.tmp / "x.npy")], (), code=0, check=_wrote("x.npy", 5)),
    "evaluate-seed-huge": Case(lambda e: ["evaluate", str(e.run5), "--data", str(e.points), "--samples",
                                          "10", "--seed", HUGE_SEED, "--quiet"], (), code=0),
    "evaluate-seed-negative": Case(lambda e: ["evaluate", str(e.run5), "--data", str(e.points),
                                              "--seed", "-1"], ("--seed",)),
    "compare-seed-negative": Case(lambda e: _compare_argv(e, extra=("--seed", "-1")), ("--seed",),
                                  check=_absent("cmp")),
    # --- sizes that cannot fit: refused before allocating
    "data-n-huge": Case(lambda e: ["data", "circle", "--n", "1000000000000", "--out", str(e.tmp / "x.npy")],
                        ("--n", "memory"), check=_absent("x.npy")),
    "sample-n-huge": Case(lambda e: ["sample", str(e.run), "--n", "10000000000000", "--out",
                                     str(e.tmp / "x.npy")], ("--n", "memory"), check=_absent("x.npy")),
    "train-samples-huge": Case(lambda e: e.train("--method", "iwae", "--samples", "1000000000"),
                               ("--samples", "memory"), check=_nothing_written),
    "compare-samples-huge": Case(lambda e: _compare_argv(e, extra=("--samples", "1000000000")),
                                 ("--samples", "memory"), check=_absent("cmp")),
    "train-n-train-huge": Case(lambda e: e.train("--n-train", "1000000000000"), ("--n-train", "memory"),
                               check=_nothing_written),
    # --- outputs checked before any work, and never two flags onto one file
    "data-out-and-codes-one-file": Case(
        lambda e: ["data", "circle", "--n", "10", "--out", str(e.tmp / "same.npy"),
                   "--codes", str(e.tmp / "same.npy")], ("--codes", "same.npy"), check=_absent("same.npy")),
    "data-codes-bad-path": Case(lambda e: ["data", "circle", "--n", "10", "--out", str(e.tmp / "c.npy"),
                                           "--codes", str(e.tmp / "bad" / "path")], ("--codes", "path"),
                                check=_absent("c.npy")),
    "data-fresh-of-an-image-set": Case(lambda e: ["data", "digits-binary", "--out", str(e.tmp / "x.npy")],
                                       ("--split",), check=_absent("x.npy")),
    "data-test-split-of-an-image-set": Case(
        lambda e: ["data", "digits-binary", "--split", "test", "--out", str(e.tmp / "test.npy")], (), code=0,
        check=_wrote("test.npy", 300)),
    "train-tensorboard-is-a-file": Case(lambda e: e.train("--tensorboard", str(_write(e.tmp / "tb", ""))),
                                        ("--tensorboard",), check=_nothing_written),
    "train-resume-and-overwrite": Case(lambda e: e.train("--resume", "--overwrite"),
                                       ("--resume", "--overwrite"), check=_nothing_written),
    # --- values stored and ignored, or accepted and useless
    "train-data-empty": Case(lambda e: e.train("--data", ""), ("--data",), check=_nothing_written),
    "train-noise-var-below-precision": Case(lambda e: e.train("--noise-var", "1e-30"), ("--noise-var",),
                                            check=_nothing_written),
    "train-image-shape-with-mlp": Case(lambda e: e.train("--image-shape", "1", "1", "2"), ("--image-shape",),
                                       check=_nothing_written),
    "train-n-train-beyond-a-file": Case(
        lambda e: e.train("--data", str(e.points), "--noise-var", "0.01", "--n-train", "5000"),
        ("--n-train", "5000", "240"), check=_nothing_written),
    "train-n-train-subset-of-a-file": Case(
        lambda e: e.train("--data", str(e.points), "--noise-var", "0.01", "--method", "vae"), (), code=0,
        check=_trained_on(60)),
    # --- strict CSV numbers
    "csv-underscore": Case(lambda e: ["evaluate", str(e.run), "--data",
                                      str(_write(e.tmp / "u.csv", "12_0,3\n4,5\n"))], ("u.csv", "12_0", "_")),
    "csv-full-width-digit": Case(lambda e: ["evaluate", str(e.run), "--data",
                                            str(_write(e.tmp / "w.csv", "１,3\n4,5\n"))], ("w.csv", "ASCII")),
    "csv-hex": Case(lambda e: ["evaluate", str(e.run), "--data",
                               str(_write(e.tmp / "h.csv", "0x10,5\n4,5\n"))],
                    ("h.csv", "0x10", "hexadecimal")),
    # --- compare follows train's rule: nothing replaced without --overwrite
    "compare-refuses-a-folder-with-results": Case(_second_compare(), ("--out", "--overwrite", "--resume"),
                                                  check=_nothing_replaced),
    "compare-fewer-methods-refused": Case(_second_compare(first=("vae", "iwae")), ("--out", "--overwrite"),
                                          check=_nothing_replaced),
    "compare-resume-reuses-finished-runs": Case(_second_compare("--resume"), (), code=0, check=_runs_reused),
    "compare-resume-cannot-drop-methods": Case(_second_compare("--resume", first=("vae", "iwae")),
                                               ("--resume", "iwae"), check=_nothing_replaced),
    "compare-resume-and-overwrite": Case(lambda e: _compare_argv(e, extra=("--resume", "--overwrite")),
                                         ("--resume", "--overwrite"), check=_absent("cmp")),
    # --- reproduce: what the user gave is checked before the pilot runs
    "reproduce-address-with-loky": Case(lambda e: ["reproduce", "--address", "localhost:8786",
                                                   "--out", str(e.tmp / "r")], ("--address",),
                                        check=_absent("r")),
    "reproduce-dask-nothing-there": Case(lambda e: ["reproduce", "--backend", "dask", "--address",
                                                    "tcp://127.0.0.1:1", "--out", str(e.tmp / "r")],
                                         ("--address", "tcp://127.0.0.1:1")),
    "reproduce-out-is-a-file": Case(lambda e: ["reproduce", "--out", str(_write(e.tmp / "taken", ""))],
                                    ("--out", "taken")),
    "reproduce-cache-dir-unwritable": Case(lambda e: ["reproduce", "--cache-dir", "/proc/mapa-vae-cache",
                                                      "--out", str(e.tmp / "r")], ("--cache-dir",),
                                           check=_absent("r")),
    **({} if importlib.util.find_spec("ray") else {
        "reproduce-ray-not-installed": Case(lambda e: ["reproduce", "--backend", "ray", "--out",
                                                       str(e.tmp / "r")], ("--backend ray", "pip"))}),
}
CASES.update(ROUND_THREE)

PATCHES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "disk-full": _no_space,
    "cache-dir-read-only": _read_only,
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_line(name, env, tmp_path, monkeypatch):
    case = CASES[name]
    env.tmp = tmp_path
    argv = case.argv(env)
    if name in PATCHES:
        PATCHES[name](monkeypatch)
    code, out, err = _call(argv)
    assert "Traceback" not in err, err
    assert code == case.code, err
    if case.code == 0:
        lines = err.splitlines()
        if case.names:  # a notice
            assert len(lines) == 1, err
            for part in case.names:
                assert part in lines[0], (part, err)
        else:
            assert lines == [], err
    else:
        assert out == "", out
        assert err.startswith("mapa-vae") and ": error: " in err, err
        assert err.endswith("\n") and err.count("\n") == 1, err
        for part in case.names:
            assert part in err, (part, err)
        assert "at at" not in err
    if case.check is not None:
        case.check(env)


def _option_entries(help_text: str) -> dict[str, str]:
    """The options section of a --help text: each option's first name and its whole entry."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", ["data", "train", "sample", "evaluate", "reproduce", "compare"])
def test_help_shows_every_default(command):
    """Every option with a default shows it in --help (flags, required and optional-file ones have none)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]  # type: ignore[union-attr]
    entries = _option_entries(sub.format_help())
    exempt = {a.option_strings[0] for a in sub._actions if a.option_strings
              and (a.required or a.nargs == 0 or a.default is None)}
    checked = [opt for opt in entries if opt not in exempt]
    assert checked, entries
    for opt in checked:
        assert "default" in entries[opt], (opt, entries[opt])
