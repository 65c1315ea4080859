"""The built-in XGBoost algorithm without Docker (pipelines/local/jobs/xgboost_algorithm.py).

The module's pure parts (hyperparameters, content types, channels, metric regexes, response encoding, the failure
file) are tested here in the project's environment, which has no xgboost: the module imports it lazily. Training and
prediction run the script as the engine does -- ``<python> xgboost_algorithm.py train`` with ``SAGEMAKER_BASE_DIR`` --
with the interpreter of the XGBoost image's environment, built by ``envs.ensure`` (marked slow). Those environments
are built once into ``$MLOPS_TEST_ENVS_DIR`` (default ``~/.cache/mlops-test-envs``, ``envs.envs_dir`` patched), so
repeated runs reuse them; without the package index the tests skip with ``EnvironmentUnavailable``'s message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipelines.local.jobs import xgboost_algorithm as xa

SCRIPT = Path(xa.__file__).resolve()
IMAGE = "683313688378.dkr.ecr.us-east-1.amazonaws.com/sagemaker-xgboost:{}"
ENV_CACHE = Path(os.environ.get("MLOPS_TEST_ENVS_DIR") or Path.home() / ".cache" / "mlops-test-envs")
#: The container's own metric definition (algorithm_mode/metrics.py).
CONTAINER_REGEX = r".*\[[0-9]+\].*#011{}:(\S+)"


# ------------------------------------------------------------------------------------------------ hyperparameters

def test_hyperparameters_parse_the_string_values_of_hyperparameters_json():
    parsed = xa.validate_hyperparameters({"num_round": "50", "eta": "0.2", "max_depth": "6", "subsample": "0.8",
                                          "objective": "binary:logistic", "eval_metric": "auc,error@0.6",
                                          "early_stopping_rounds": "10", "seed": "7", "monotone_constraints": "(1,-1)",
                                          "tree_method": "hist", "_tuning_objective_metric": "validation:auc"})
    assert parsed == {"num_round": 50, "eta": 0.2, "max_depth": 6, "subsample": 0.8, "objective": "binary:logistic",
                      "eval_metric": ["auc", "error@0.6"], "early_stopping_rounds": 10, "seed": 7,
                      "monotone_constraints": (1, -1), "tree_method": "hist",
                      "_tuning_objective_metric": "validation:auc"}
    assert isinstance(parsed["num_round"], int) and isinstance(parsed["eta"], float)


def test_hyperparameters_aliases_and_json_typed_values():
    parsed = xa.validate_hyperparameters({"num_round": 5, "learning_rate": "0.1", "reg_lambda": 2, "reg_alpha": "0",
                                          "min_split_loss": "1.5"})
    assert parsed == {"num_round": 5, "eta": 0.1, "lambda": 2.0, "alpha": 0.0, "gamma": 1.5}


@pytest.mark.parametrize(("raw", "message"), [
    ({"eta": "0.1"}, "Missing required hyperparameter: num_round"),
    ({"num_round": "10", "n_estimators": "5"}, "Extraneous hyperparameter found: n_estimators"),
    ({"num_round": "1.5"}, "Hyperparameter num_round: could not parse value (caused by ValueError)"),
    ({"num_round": "0"}, "Hyperparameter num_round: 0 is not in [1, +inf)"),
    ({"num_round": "10", "eta": "1.5"}, "Hyperparameter eta: 1.5 is not in [0, 1]"),
    ({"num_round": "10", "subsample": "0"}, "Hyperparameter subsample: 0.0 is not in (0, 1]"),
    ({"num_round": "10", "booster": "gbforest"}, "Hyperparameter booster: gbforest is not in ['gbtree', 'gblinear'"),
    ({"num_round": "10", "eval_metric": "rmse,foo"}, "Hyperparameter eval_metric: value ['rmse', 'foo'] not in range"),
    ({"num_round": "10", "eval_metric": "rmse@2"}, "Metric 'rmse@2' is not supported"),
    ({"num_round": "10", "objective": "multi:softmax"}, "Require input for parameter 'num_class'"),
    ({"num_round": "10", "objective": "reg:squarederror", "eval_metric": "auc"}, "Metric 'auc' can only be applied"),
    ({"num_round": "10", "eval_metric": "auc"}, "Metric 'auc' can only be applied"),
    ({"num_round": "10", "monotone_constraints": "(1,0)"}, "monotone_constraints can be used only when"),
    ({"num_round": "10", "monotone_constraints": "(1,2)", "tree_method": "hist"}, "not in range [-1, 0, 1]"),
    ({"num_round": "10", "_tuning_objective_metric": "validation:foo"}, "_tuning_objective_metric: validation:foo"),
    ({"num_round": "10", "updater": "grow_colmaker,grow_histmaker"}, "Only one tree grow plugin can be selected"),
])
def test_hyperparameter_errors_are_the_containers(raw, message):
    with pytest.raises(xa.UserError) as caught:
        xa.validate_hyperparameters(raw)
    assert message in str(caught.value)


def test_eval_metrics_split_xgboost_and_custom_metrics_as_the_container():
    assert xa.eval_metrics(None, None) == ([], [], [])
    assert xa.eval_metrics(None, ["logloss", "accuracy"]) == (["logloss"], ["accuracy"], [])
    # the tuning metric joins eval_metric (sorted union), 1.7-1 computes rmse itself
    assert xa.eval_metrics("validation:rmse", ["mae", "logloss"]) == (["logloss"], ["mae", "rmse"], ["rmse"])
    assert xa.eval_metrics("validation:rmse", None, xa.LEGACY_CUSTOM_METRICS) == (["rmse"], [], ["rmse"])


# ------------------------------------------------------------------------------------- content types and channels

@pytest.mark.parametrize(("value", "kind"), [
    (None, "libsvm"), ("", "libsvm"), ("text/csv", "csv"), ("csv", "csv"), ("text/csv; label_size=1", "csv"),
    ("TEXT/CSV;charset=utf-8", "csv"), ("libsvm", "libsvm"), ("text/libsvm", "libsvm"), ("text/x-libsvm", "libsvm"),
    ("application/x-parquet", "parquet"), ("application/x-recordio-protobuf", "recordio-protobuf"),
])
def test_content_type_resolution(value, kind):
    assert xa.resolve_content_type(value) == kind


@pytest.mark.parametrize("value", ["application/json", "text/csv;label_size=2", "image/png"])
def test_content_type_errors(value):
    with pytest.raises(xa.UserError, match="is not an accepted"):
        xa.resolve_content_type(value)


def test_channels_validation():
    channels = xa.validate_channels({"train": {"ContentType": "text/csv"}, "validation": {"ContentType": ""}})
    assert channels["train"]["FileType"] == "csv" and channels["validation"]["FileType"] == "libsvm"
    with pytest.raises(xa.UserError, match="Missing required channel: train"):
        xa.validate_channels({"validation": {}})
    with pytest.raises(xa.UserError, match="Extraneous channel found: test"):
        xa.validate_channels({"train": {}, "test": {}})
    with pytest.raises(xa.UserError, match="Pipe mode not supported for LibSVM"):
        xa.validate_channels({"train": {"ContentType": "libsvm", "TrainingInputMode": "Pipe"}})


def test_channel_files_are_recursive_and_skip_hidden_and_underscore_files(tmp_path):
    for name in ("b.csv", "a.csv", "sub/c.csv", ".hidden.csv", ".git/x.csv", "_SUCCESS", "dtrain.cache"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("1,2\n")
    assert [p.relative_to(tmp_path).as_posix() for p in xa.channel_files(tmp_path)] == ["a.csv", "b.csv",
                                                                                         "sub/c.csv"]


def test_libsvm_validation_rejects_csv_with_the_containers_message(tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("1.0,2.0,3.0\n")
    with pytest.raises(xa.UserError) as caught:
        xa.validate_libsvm_file(data)
    assert str(caught.value).startswith("First line '1.0,2.0,3.0")
    assert "of file 'train.csv' is not 'LIBSVM' format" in str(caught.value)
    good = tmp_path / "train.libsvm"
    good.write_text("1 0:0.5 3:1.25\n0 1:2\n")
    xa.validate_libsvm_file(good)


# ---------------------------------------------------------------------------------------------------------- metrics

def test_metric_definitions_cover_train_and_validation_of_every_container_metric():
    definitions = xa.metric_definitions()
    names = [d["Name"] for d in definitions]
    assert len(names) == len(set(names)) == 2 * len(xa.MAXIMIZE_METRICS + xa.MINIMIZE_METRICS)
    for name in ("validation:rmse", "train:rmse", "validation:mae", "validation:logloss", "validation:error",
                 "validation:auc", "validation:merror", "validation:mlogloss", "validation:ndcg", "validation:map",
                 "validation:mse", "validation:accuracy", "validation:f1", "train:auc"):
        assert name in names
    assert all(set(d) == {"Name", "Regex"} for d in definitions)
    assert xa.metric_direction("validation:auc") == "Maximize"
    assert xa.metric_direction("validation:rmse") == "Minimize"


def _value(metric: str, text: str) -> float | None:
    found = re.findall(xa.metric_regex(metric), text)
    return float(found[-1]) if found else None


def test_metric_regexes_against_log_lines():
    line = xa.format_evaluation(12, [("train-rmse", 0.25), ("train-mae", 0.2), ("validation-rmse", 0.3),
                                     ("validation-mae", 1.5e-7), ("validation-merror", 0.125)])
    assert line == ("[12]#011train-rmse:0.25000#011train-mae:0.20000#011validation-rmse:0.30000"
                    "#011validation-mae:0.00000#011validation-merror:0.12500")
    assert _value("validation:rmse", line) == 0.3
    assert _value("train:rmse", line) == 0.25
    assert _value("validation:merror", line) == 0.125
    assert _value("validation:error", line) is None  # not merror's value
    assert _value("validation:auc", line) is None
    # a real tab (xgboost's own print), exponents, and the last line wins
    text = "[0]\ttrain-rmse:5.1\tvalidation-rmse:1e-3\n[1]#011train-rmse:4.0#011validation-rmse:-2.5E+2\n"
    assert _value("validation:rmse", text) == -250.0
    assert re.findall(xa.metric_regex("validation:rmse"), text) == ["1e-3", "-2.5E+2"]
    assert _value("validation:rmse", "[2023-01-01:00:00:00:INFO] validation-rmse:5") is None
    # the container's own regex matches the local lines too
    assert re.findall(CONTAINER_REGEX.format("validation-merror"), line) == ["0.12500"]


# --------------------------------------------------------------------------------------------- responses, failures

def test_encode_predictions_as_the_containers_server():
    assert xa.encode_predictions([0.5, 1.25], "text/csv", batch=False) == b"0.5\n1.25\n"
    assert json.loads(xa.encode_predictions([0.5, 1.25], "application/json", batch=False)) == {
        "predictions": [{"score": 0.5}, {"score": 1.25}]}
    assert xa.encode_predictions([0.5, 1.25], "application/json", batch=True) == b"0.5\n1.25\n"
    assert xa.encode_predictions([[0.1, 0.9]], "text/csv", batch=False) == b"0.1,0.9\n"


def test_accept_resolution(monkeypatch):
    monkeypatch.delenv("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", raising=False)
    assert xa._resolve_accept(None) == "text/csv"
    assert xa._resolve_accept("*/*") == "text/csv"
    assert xa._resolve_accept("Application/JSON; charset=utf-8") == "application/json"
    monkeypatch.setenv("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "application/json")
    assert xa._resolve_accept("") == "application/json"
    with pytest.raises(xa.InferenceError) as caught:
        xa._resolve_accept("application/x-npy")
    assert caught.value.status == 406


def test_failure_file_without_xgboost(tmp_path):
    """Hyperparameters are checked before xgboost is imported: this runs in the project's environment."""
    (tmp_path / "input" / "config").mkdir(parents=True)
    (tmp_path / "input" / "config" / "hyperparameters.json").write_text(json.dumps({"eta": "0.3"}))
    assert xa.run_training(tmp_path) == 1
    failure = (tmp_path / "output" / "failure").read_text()
    assert failure == "ClientError: Missing required hyperparameter: num_round\n"
    assert not (tmp_path / "model" / "xgboost-model").exists()


def test_module_imports_no_project_code():
    source = SCRIPT.read_text()
    assert not re.search(r"^\s*(from|import)\s+pipelines\b", source, re.MULTILINE)
    assert not re.search(r"^(from|import)\s+(xgboost|numpy|scipy|pandas)\b", source, re.MULTILINE)


# ------------------------------------------------------------------------------------ with an XGBoost environment

def _build(tag: str) -> Path:
    from pipelines.local.jobs import envs

    ENV_CACHE.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(envs, "envs_dir", lambda: ENV_CACHE)
        try:
            return envs.ensure(envs.spec_for(IMAGE.format(tag))).python
        except envs.EnvironmentUnavailable as exc:
            pytest.skip(f"no xgboost environment for {tag}: {exc}")


@pytest.fixture(scope="session")
def image_python():
    """``image_python("1.7-1")``: the interpreter of that image's environment (built once, cached)."""
    built: dict[str, Path] = {}

    def get(tag: str) -> Path:
        if tag not in built:
            built[tag] = _build(tag)
        return built[tag]

    return get


def _regression(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, 4))
    y = 10 + 3 * x[:, 0] - 2 * x[:, 1] + x[:, 2] * x[:, 3] + rng.normal(scale=0.3, size=n)
    return np.column_stack([y, x])


def _job(root: Path, hyperparameters: dict, channels: dict[str, tuple[str | None, dict[str, str]]]) -> Path:
    """An /opt/ml layout: ``channels`` = name -> (ContentType or None for none, {relative path: content})."""
    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    data_config = {}
    for name, (content_type, files) in channels.items():
        data_config[name] = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"}
        if content_type is not None:
            data_config[name]["ContentType"] = content_type
        for relative, content in files.items():
            path = root / "input" / "data" / name / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    (config / "inputdataconfig.json").write_text(json.dumps(data_config))
    return root


def _csv(rows: np.ndarray) -> str:
    return "\n".join(",".join(f"{v:.6f}" for v in row) for row in rows) + "\n"


def _train(python: Path, job: Path, *args: str) -> subprocess.CompletedProcess:
    """The engine's invocation: the script file, ``SAGEMAKER_BASE_DIR``, no PYTHONPATH (no project imports)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"SAGEMAKER_BASE_DIR": str(job), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    return subprocess.run([str(python), str(SCRIPT), "train", *args], env=env, cwd=job, capture_output=True,
                          text=True, timeout=600)


def _in_env(python: Path, code: str, cwd: Path) -> dict:
    """Run ``code`` in the xgboost environment (``xa``: this module imported by path); its last stdout line, JSON."""
    prelude = textwrap.dedent(f"""
        import importlib.util, json, pickle, sys
        spec = importlib.util.spec_from_file_location("xa", {str(SCRIPT)!r})
        xa = sys.modules["xa"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(xa)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    done = subprocess.run([str(python), "-c", prelude + textwrap.dedent(code)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


_LOAD_AND_SCORE = """
    import numpy as np, xgboost as xgb
    try:
        booster, fmt = pickle.load(open(MODEL, "rb")), "pickle"
    except Exception:
        booster, fmt = xgb.Booster(), "xgboost"
        booster.load_model(MODEL)
    data = np.loadtxt(VALIDATION, delimiter=",")
    pred = booster.predict(xgb.DMatrix(data[:, 1:]))
    print(json.dumps({"format": fmt, "rmse": float(np.sqrt(np.mean((pred - data[:, 0]) ** 2)))}))
"""


@pytest.fixture(scope="module")
def regression_data():
    rng = np.random.default_rng(7)
    return _regression(rng, 400), _regression(rng, 120)


@pytest.mark.slow
@pytest.mark.parametrize(("tag", "model_format"), [("1.7-1", "xgboost"), ("1.0-1", "pickle")])
def test_csv_regression_with_validation(image_python, regression_data, tmp_path, tag, model_format):
    train, validation = regression_data
    job = _job(tmp_path / "job", {"num_round": "40", "max_depth": "3", "eta": "0.3"},
               {"train": ("text/csv", {"train.csv": _csv(train)}),
                "validation": ("text/csv", {"validation.csv": _csv(validation)})})
    done = _train(image_python(tag), job)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (job / "output" / "failure").exists() and (job / "output" / "success").exists()
    lines = [line for line in done.stdout.splitlines() if re.match(r"^\[\d+\]#011", line)]
    assert len(lines) == 40 and lines[0].startswith("[0]#011train-rmse:")
    values = {d["Name"]: re.findall(d["Regex"], done.stdout) for d in xa.metric_definitions()}
    assert len(values["validation:rmse"]) == len(values["train:rmse"]) == 40
    assert not values["validation:mae"] and not values["validation:auc"]
    final = float(values["validation:rmse"][-1])
    assert final < 0.5 * validation[:, 0].std()
    assert float(re.findall(CONTAINER_REGEX.format("validation-rmse"), done.stdout)[-1]) == final
    scored = _in_env(image_python(tag), f"MODEL = {str(job / 'model' / 'xgboost-model')!r}\n"
                     f"VALIDATION = {str(job / 'input' / 'data' / 'validation' / 'validation.csv')!r}\n"
                     + textwrap.dedent(_LOAD_AND_SCORE), tmp_path)
    assert scored["format"] == model_format  # 1.7-1: Booster.save_model; 1.0-1: pickle of the Booster
    assert scored["rmse"] == pytest.approx(final, abs=1e-4)


@pytest.mark.slow
def test_log_lines_are_xgboosts_own_with_011_for_tabs(image_python, regression_data, tmp_path):
    """The evaluation lines are those xgboost prints itself (verbose_eval) for the same training, tabs as #011."""
    train, validation = regression_data
    params = {"max_depth": 4, "eta": 0.2, "objective": "reg:squarederror", "eval_metric": ["mape", "rmsle"]}
    job = _job(tmp_path / "job", {**{k: str(v) for k, v in params.items()}, "eval_metric": "mape,rmsle",
                                  "num_round": "15"},
               {"train": ("csv", {"train.csv": _csv(train)}),
                "validation": ("csv", {"validation.csv": _csv(validation)})})
    python = image_python("1.7-1")
    done = _train(python, job)
    assert done.returncode == 0, done.stdout + done.stderr
    ours = [line for line in done.stdout.splitlines() if line.startswith("[") and "#011" in line]
    data = job / "input" / "data"
    reference = _in_env(python, f"""
        import contextlib, io, numpy as np, xgboost as xgb
        t = np.loadtxt({str(data / "train" / "train.csv")!r}, delimiter=",")
        v = np.loadtxt({str(data / "validation" / "validation.csv")!r}, delimiter=",")
        dt, dv = xgb.DMatrix(t[:, 1:], label=t[:, 0]), xgb.DMatrix(v[:, 1:], label=v[:, 0])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            xgb.train({params!r}, dt, 15, evals=[(dt, "train"), (dv, "validation")], verbose_eval=True)
        print(json.dumps(out.getvalue().splitlines()))
    """, tmp_path)
    assert len(reference) == 15 and reference[0].startswith("[0]\ttrain-mape:")
    assert ours == [line.replace("\t", "#011") for line in reference]


@pytest.mark.slow
def test_model_format_option_pickle(image_python, regression_data, tmp_path):
    train, _ = regression_data
    job = _job(tmp_path / "job", {"num_round": "5"}, {"train": ("text/csv", {"train.csv": _csv(train)})})
    python = image_python("1.7-1")
    done = _train(python, job, "--model-format", "pickle")
    assert done.returncode == 0, done.stdout + done.stderr
    loaded = _in_env(python, f"""
        booster = pickle.load(open({str(job / 'model' / 'xgboost-model')!r}, "rb"))
        print(json.dumps({{"type": type(booster).__name__, "rounds": booster.num_boosted_rounds()}}))
    """, tmp_path)
    assert loaded == {"type": "Booster", "rounds": 5}


def _libsvm(rows: np.ndarray) -> str:
    return "".join(" ".join([f"{row[0]:.6f}", *(f"{i}:{v:.6f}" for i, v in enumerate(row[1:]) if v > -0.5)]) + "\n"
                   for row in rows)


@pytest.mark.slow
def test_libsvm_channel_files_joined_recursively(image_python, regression_data, tmp_path):
    train, validation = regression_data
    files = {"part-0.libsvm": _libsvm(train[:150]), "more/part-1.libsvm": _libsvm(train[150:]),
             ".partial": "garbage that is not libsvm\n", "_SUCCESS": ""}
    # no ContentType at all (the container's default) and an empty one (what the engine writes for none)
    job = _job(tmp_path / "job", {"num_round": "30", "max_depth": "3", "eval_metric": "rmse"},
               {"train": (None, files), "validation": ("", {"v.libsvm": _libsvm(validation)})})
    done = _train(image_python("1.7-1"), job)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Train matrix has 400 rows" in done.stdout and "Validation matrix has 120 rows" in done.stdout
    final = _value("validation:rmse", done.stdout)
    assert final is not None and final < 0.6 * validation[:, 0].std()


@pytest.mark.slow
def test_missing_num_round_fails_with_client_error(image_python, regression_data, tmp_path):
    train, _ = regression_data
    job = _job(tmp_path / "job", {"eta": "0.3"}, {"train": ("text/csv", {"train.csv": _csv(train)})})
    done = _train(image_python("1.7-1"), job)
    assert done.returncode == 1
    failure = (job / "output" / "failure").read_text()
    assert failure.startswith("ClientError: ") and "num_round" in failure and failure.count("\n") == 1
    assert not (job / "model" / "xgboost-model").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("content_type", "files", "expected"), [
    ("application/x-parquet", {"train.parquet": "PAR1"}, "not supported by the local engine"),
    ("application/x-recordio-protobuf", {"train.rec": "x"}, "recordio-protobuf"),
    (None, {"train.csv": "10.5,1.0,2.0\n11.5,2.0,3.0\n"}, "is not 'LIBSVM' format"),
    ("text/csv", {"train.csv": "label,a,b\n1,2,3\n"}, "Failed to load csv data"),
    ("text/csv", {}, "No data in training channel path"),
])
def test_unsupported_or_wrong_data_fails_clearly(image_python, tmp_path, content_type, files, expected):
    job = _job(tmp_path / "job", {"num_round": "5"}, {"train": (content_type, files)})
    (job / "input" / "data" / "train").mkdir(parents=True, exist_ok=True)
    done = _train(image_python("1.7-1"), job)
    assert done.returncode == 1, done.stdout
    failure = (job / "output" / "failure").read_text()
    assert failure.startswith("ClientError: ") and expected in failure, failure


@pytest.mark.slow
def test_early_stopping_on_the_tuning_metric_keeps_the_best_iteration(image_python, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(600, 5))
    y = ((x[:, 0] + 0.5 * x[:, 1]) > 0).astype(float)
    y = np.where(rng.random(600) < 0.25, 1 - y, y)  # label noise: the model overfits, validation accuracy stalls
    rows = np.column_stack([y, x])
    job = _job(tmp_path / "job", {"num_round": "300", "max_depth": "6", "eta": "0.5", "objective": "binary:logistic",
                                  "eval_metric": "logloss", "early_stopping_rounds": "5",
                                  "_tuning_objective_metric": "validation:accuracy"},
               {"train": ("text/csv", {"t.csv": _csv(rows[:450])}),
                "validation": ("text/csv", {"v.csv": _csv(rows[450:])})})
    python = image_python("1.7-1")
    done = _train(python, job)
    assert done.returncode == 0, done.stdout + done.stderr
    accuracies = [float(v) for v in re.findall(xa.metric_regex("validation:accuracy"), done.stdout)]
    assert 5 < len(accuracies) < 300 and all(0.0 <= a <= 1.0 for a in accuracies)
    assert re.findall(xa.metric_regex("validation:logloss"), done.stdout)
    saved = _in_env(python, f"""
        import numpy as np, xgboost as xgb
        booster = xgb.Booster()
        booster.load_model({str(job / 'model' / 'xgboost-model')!r})
        data = np.loadtxt({str(job / 'input/data/validation/v.csv')!r}, delimiter=",")
        p = booster.predict(xgb.DMatrix(data[:, 1:]))
        accuracy = float(np.mean((p > 0.5) == data[:, 0]))
        print(json.dumps({{"rounds": booster.num_boosted_rounds(), "accuracy": accuracy}}))
    """, tmp_path)
    best = int(np.argmax(accuracies))  # EarlyStopping keeps the first best
    assert saved["rounds"] == best + 1
    assert saved["accuracy"] == pytest.approx(accuracies[best], abs=1e-5)


@pytest.mark.slow
def test_custom_metrics_match_scikit_learn(image_python, tmp_path):
    """The numpy metrics against the scikit-learn ones the container calls (the environment has scikit-learn)."""
    result = _in_env(image_python("1.7-1"), """
        import numpy as np
        from sklearn import metrics as m
        rng = np.random.default_rng(0)
        out = {}
        binary, margins = rng.integers(0, 2, 200).astype(float), rng.normal(size=200)
        multi, scores = rng.integers(0, 4, 200).astype(float), rng.normal(size=(200, 4))
        y, p = rng.normal(size=200), rng.normal(size=200)
        sk = {"accuracy": m.accuracy_score, "balanced_accuracy": m.balanced_accuracy_score,
              "f1": lambda a, b: m.f1_score(a, b, average="macro"), "f1_binary": m.f1_score,
              "f1_macro": lambda a, b: m.f1_score(a, b, average="macro"), "precision": m.precision_score,
              "precision_macro": lambda a, b: m.precision_score(a, b, average="macro"),
              "precision_micro": lambda a, b: m.precision_score(a, b, average="micro"), "recall": m.recall_score,
              "recall_macro": lambda a, b: m.recall_score(a, b, average="macro"),
              "recall_micro": lambda a, b: m.recall_score(a, b, average="micro")}
        for name, fn in sk.items():
            out[name] = [xa.custom_metric(name, margins, binary, True), fn(binary, (margins > 0).astype(int))]
            if name not in ("f1_binary", "precision", "recall"):
                out[name + "/multi"] = [xa.custom_metric(name, scores, multi, True), fn(multi, scores.argmax(1))]
        for name, fn in {"mse": m.mean_squared_error, "mae": m.mean_absolute_error, "r2": m.r2_score,
                         "rmse": lambda a, b: m.mean_squared_error(a, b) ** 0.5}.items():
            out[name] = [xa.custom_metric(name, p, y, True), fn(y, p)]
        try:
            xa.custom_metric("f1_binary", scores, multi, True)
        except ValueError as exc:
            out["multiclass_binary_error"] = str(exc)
        print(json.dumps(out))
    """, tmp_path)
    assert "Target is multiclass but average='binary'" in result.pop("multiclass_binary_error")
    for name, (ours, theirs) in result.items():
        assert ours == pytest.approx(theirs, abs=1e-12), name


@pytest.mark.slow
def test_predict_csv_libsvm_json_and_batch(image_python, regression_data, tmp_path):
    train, validation = regression_data
    job = _job(tmp_path / "job", {"num_round": "20", "max_depth": "3"},
               {"train": ("text/csv", {"train.csv": _csv(train)})})
    python = image_python("1.7-1")
    assert _train(python, job).returncode == 0
    features = np.round(validation[:5, 1:], 6)
    csv_body = "\n".join(",".join(f"{v:.6f}" for v in row) for row in features)
    libsvm_body = "".join("0 " + " ".join(f"{i}:{v:.6f}" for i, v in enumerate(row)) + "\n" for row in features)
    result = _in_env(python, f"""
        import numpy as np, xgboost as xgb
        model = xa.load_model({str(job / 'model')!r})
        expected = model.predict(xgb.DMatrix(np.array({features.tolist()!r}))).tolist()
        out = {{"expected": expected, "format": model.sagemaker_model_format}}
        body, mime = xa.predict(model, {csv_body.encode()!r}, "text/csv", "text/csv", batch=False)
        out["csv"] = [mime, body.decode()]
        body, mime = xa.predict(model, {csv_body.encode()!r}, "text/csv", "application/json", batch=False)
        out["json"] = [mime, json.loads(body)]
        body, mime = xa.predict(model, {libsvm_body.encode()!r}, "text/libsvm", "*/*", batch=False)
        out["libsvm"] = [mime, body.decode()]
        body, mime = xa.predict(model, {csv_body.encode()!r}, "text/csv", "application/json", batch=True)
        out["batch"] = [mime, body.decode()]
        out["empty"] = xa.predict(model, b"", "text/csv", "text/csv")[0].decode()
        errors = {{}}
        for key, args in {{"accept": ({csv_body.encode()!r}, "text/csv", "application/x-npy"),
                          "payload": (b"a,b\\n1", "text/csv", "text/csv"),
                          "type": ({csv_body.encode()!r}, "application/x-parquet", "text/csv")}}.items():
            try:
                xa.predict(model, *args)
            except xa.InferenceError as exc:
                errors[key] = exc.status
        out["errors"] = errors
        print(json.dumps(out))
    """, tmp_path)
    expected = result["expected"]
    assert result["format"] == "xgb_format"
    assert result["csv"][0] == "text/csv"
    assert [float(v) for v in result["csv"][1].splitlines()] == pytest.approx(expected, rel=1e-6)
    assert result["json"][0] == "application/json"
    assert [p["score"] for p in result["json"][1]["predictions"]] == pytest.approx(expected, rel=1e-6)
    assert [float(v) for v in result["libsvm"][1].splitlines()] == pytest.approx(expected, rel=1e-6)
    assert result["batch"][1].endswith("\n") and len(result["batch"][1].splitlines()) == 5
    assert result["empty"] == ""
    assert result["errors"] == {"accept": 406, "payload": 415, "type": 415}
