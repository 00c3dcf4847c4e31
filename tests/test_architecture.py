"""The package's structure: one config drives the flags, registries drive every choice, a new
method slots in as one class plus one registry entry, and imports go one way."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest
from torch import Tensor

import mapa_vae
from mapa_vae import registry
from mapa_vae.cli import build_parser, main
from mapa_vae.config import TrainConfig, flag_name
from mapa_vae.data.dataset import Dataset
from mapa_vae.experiments.compare import compare
from mapa_vae.experiments.reproduce import reproduce
from mapa_vae.experiments.sweep import Profile
from mapa_vae.inference.objectives import Autoencoder, EmpiricalLogLikelihood, Objective
from mapa_vae.methods import Architecture, Method
from mapa_vae.models import CodeEncoder, Decoder, LatentVariableModel, Likelihood, StandardNormal
from mapa_vae.models.copula import fit_copula_prior, mapped_model
from mapa_vae.registry import METHODS, Registry

PACKAGE = Path(mapa_vae.__file__).parent
RUN_FLAGS = {"resume", "quiet", "out", "overwrite", "help"}  # how to run, not what to train


# --- imports go one way -------------------------------------------------------------------------


def _import_graph() -> dict[str, set[str]]:
    """Module → package modules it imports (any import statement, at any depth of the file)."""
    modules = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, f in modules.items():
        base = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = base[: len(base) - node.level + 1] if node.level else []
                target = ".".join(parts + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for t in names:
                if t in modules and t != m and not t.startswith(m + ".") and not m.startswith(t + "."):
                    graph[m].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _import_graph()
    assert len(graph) > 30 and graph["mapa_vae.training.loop"]  # the walk found the package
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_are_one_concept_in_size():
    sizes = {f.relative_to(PACKAGE): len(f.read_text().splitlines()) for f in PACKAGE.rglob("*.py")}
    too_big = {str(f): n for f, n in sizes.items() if n > 500}
    assert not too_big, too_big


# --- one config, generated flags ----------------------------------------------------------------


def _train_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["train"]  # type: ignore[attr-defined]


def test_every_config_field_has_a_flag_and_every_flag_a_field():
    parser = _train_parser()
    flags = {a.dest for a in parser._actions} - RUN_FLAGS
    fields = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}
    assert flags == fields
    for f in dataclasses.fields(TrainConfig):
        if f.name in fields:
            action = next(a for a in parser._actions if a.dest == f.name)
            assert flag_name(f.name) in action.option_strings
            assert f.metadata["help"].split()[0] in (action.help or "")


def test_help_lists_each_registry_and_every_default():
    text = _train_parser().format_help()
    for name in dir(registry):
        reg = getattr(registry, name)
        if isinstance(reg, Registry):
            for entry in reg:
                assert entry in text, (name, entry)
    assert "(default: 100)" in text and "(default: 0.001)" in text


def test_config_file_and_flags_share_one_schema(tmp_path):
    with pytest.raises(mapa_vae.MapaError, match=r"epochs \(--epochs\) must be an integer, got 'ten'"):
        TrainConfig.from_dict({"epochs": "ten"})
    with pytest.raises(mapa_vae.MapaError, match="lr"):
        TrainConfig(lr=float("nan"))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rc = main(["train", "--rho", "1.5", "--out", str(tmp_path / "r")])
    assert rc == 2 and "rho (--rho) must be below 1" in stderr.getvalue()


# --- a new method is one class plus one registry entry -------------------------------------------


class AutoencoderMethod(Method):
    """A toy method: a deterministic autoencoder trained by the autoencoder bound (paper Eq. 14),
    given the copula prior afterwards. docs/design.md §14 "How to add a method" is this class."""

    name = "toy-autoencoder"
    uses_samples = False

    def build(self, arch: Architecture, likelihood: Likelihood, cfg: TrainConfig) -> LatentVariableModel:
        encoder_net, decoder_net = arch.networks()
        encoder = CodeEncoder(encoder_net(arch.latent_dim))
        decoder = Decoder(decoder_net(), likelihood)
        return LatentVariableModel(encoder, decoder, StandardNormal(arch.latent_dim))

    def objective(self, model: LatentVariableModel, train: Tensor, cfg: TrainConfig,
                  data: Dataset | None = None) -> Objective:
        return Autoencoder(train.shape[0])

    def validation_log_likelihood(self, model: LatentVariableModel, val: Tensor, train: Tensor,
                                  cfg: TrainConfig) -> float:
        return float(EmpiricalLogLikelihood(train)(model, val).value.mean())

    def finalize(self, model: LatentVariableModel, train: Tensor,
                 cfg: TrainConfig) -> tuple[LatentVariableModel, dict[str, Any]]:
        final, fit = fit_copula_prior(model, train, seed=cfg.seed)
        return final, {"prior_decoder_kl": fit.decoder_kl}

    def build_final(self, arch: Architecture, likelihood: Likelihood,
                    cfg: TrainConfig) -> LatentVariableModel:
        return mapped_model(self.build(arch, likelihood, cfg))


@pytest.fixture
def toy_method():
    METHODS.register(AutoencoderMethod())  # under its own name
    yield AutoencoderMethod.name
    METHODS.unregister(AutoencoderMethod.name)


TINY = {"n_train": 120, "n_val": 60, "n_test": 120, "eval_every": 1, "val_grid": 2**10,
        "test_grid": 2**11, "hidden": (8,)}


@pytest.mark.slow
def test_a_registered_method_runs_through_train_compare_and_reproduce(toy_method, tmp_path):
    # train, through the generated CLI (its name is a valid --method choice now)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["train", "--data", "circle", "--method", toy_method, "--epochs", "3",
                   "--n-train", "120", "--n-val", "60", "--n-test", "120", "--hidden", "8",
                   "--test-grid", "2048", "--quiet", "--out", str(tmp_path / "train")])
    assert rc == 0
    metrics = json.loads(stdout.getvalue())
    assert metrics["method"] == toy_method and metrics["samples"] is None and metrics["k"] is None
    assert metrics["test_kl"] == pytest.approx(metrics["test_log_lik_truth"] - metrics["test_log_lik"])
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["sample", str(tmp_path / "train"), "--n", "20", "--out", str(tmp_path / "x.npy")]) == 0

    # compare, beside the VAE
    table = compare("circle", tmp_path / "compare", epochs=2, samples=10, progress=False,
                    methods=(toy_method, "vae"), cache_dir=str(tmp_path / "cache"), **TINY)
    assert set(table) == {toy_method, "vae"}
    assert toy_method in (tmp_path / "compare" / "comparison.md").read_text()

    # reproduce: a registered method is a variant under its own name
    profile = Profile("toy", ("circle",), (10,), restarts=1, draws=1, variants=(toy_method, "vae"),
                      train={**TINY, "epochs": 2, "prior_steps": 20})
    report = reproduce(profile, tmp_path / "repro", progress=False, cache_dir=str(tmp_path / "cache"))
    assert toy_method in report.read_text()
    summary = json.loads((tmp_path / "repro" / "summary.json").read_text())
    assert {r["variant"] for r in summary} == {toy_method, "vae"}
    assert all(r["samples"] == 1 for r in summary)  # neither uses S: one job per cell


def test_unregistering_removes_the_choice(toy_method):
    assert toy_method in _train_parser().format_help()
    METHODS.unregister(toy_method)
    assert toy_method not in _train_parser().format_help()
    with pytest.raises(mapa_vae.MapaError, match="unknown method"):
        TrainConfig(method=toy_method)
    METHODS.register(AutoencoderMethod())  # for the fixture's teardown


def test_registry_refuses_a_second_entry_under_one_name():
    reg: Registry[int] = Registry("number")
    reg.register("one", 1)
    reg.register("one", 1)  # the same entry again (a module imported twice) is fine
    with pytest.raises(mapa_vae.MapaError, match="already registered"):
        reg.register("one", 2)
    assert reg["one"] == 1 and list(reg) == ["one"]


# --- each name written once ---------------------------------------------------------------------


def test_register_reads_the_entrys_own_name():
    reg: Registry[Any] = Registry("toy")

    class Thing:
        name = "thing"

    assert reg.register(Thing) is Thing and reg["thing"] is Thing
    with pytest.raises(mapa_vae.MapaError, match="class attribute 'name'"):
        reg.register(object())


def test_entries_are_registered_under_their_own_names():
    for reg in (METHODS, registry.LIKELIHOODS, registry.ESTIMATORS):
        for key, entry in reg.items():
            assert entry.name == key, (reg.kind, key)


def test_lists_of_names_come_from_the_registries():
    from mapa_vae.inference.score_function import SIGNALS

    assert METHODS["iwae"].estimators == registry.estimators_of("iwae") == ("naive", "stl", "dreg")
    assert METHODS["sbn"].estimators == registry.estimators_of("score-function")
    assert METHODS["vae"].estimators == () and METHODS["mapa"].estimators == ()
    assert set(SIGNALS) <= set(registry.estimators_of("score-function"))
    assert {f"learned-{s}" for s in SIGNALS} <= set(registry.POSTERIORS)


def test_every_method_module_is_imported_by_the_package():
    import pkgutil
    import sys

    import mapa_vae.methods as methods

    for module in pkgutil.iter_modules(methods.__path__):
        assert f"mapa_vae.methods.{module.name}" in sys.modules, module.name


def test_the_pass_grid_is_the_papers_grid():
    from mapa_vae.experiments.reproduce import PASS_GRID
    from mapa_vae.experiments.sweep import PROFILES

    assert PROFILES["paper"].samples == PASS_GRID


def _commands() -> dict[str, Any]:
    return next(a for a in build_parser()._actions if a.dest == "command").choices  # type: ignore[attr-defined]


def test_cli_choices_are_the_tables_they_name():
    from mapa_vae.experiments.sweep import BACKENDS, PROFILES

    actions = {a.dest: a for a in _commands()["reproduce"]._actions}
    assert list(actions["profile"].choices) == list(PROFILES)
    assert list(actions["backend"].choices) == list(BACKENDS)


def test_one_threads_flag_on_every_command_with_the_configs_floor():
    low = next(f for f in dataclasses.fields(TrainConfig) if f.name == "threads").metadata["low"]
    for name, command in _commands().items():
        assert any("--threads" in a.option_strings for a in command._actions), name
    assert not any("--threads" in a.option_strings for a in build_parser()._actions)  # not twice
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit):
        main(["data", "circle", "--out", "x.npy", "--threads", str(low - 1)])
    assert f"must be at least {low}" in stderr.getvalue()


def test_the_old_place_of_threads_still_works(tmp_path):
    out = tmp_path / "x.npy"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--threads", "1", "data", "circle", "--n", "5", "--out", str(out)]) == 0
    assert out.exists()
