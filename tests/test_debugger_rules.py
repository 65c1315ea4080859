"""Debugger hook config + local built-in rules (pipelines/local/debugger/hooks.py, pipelines/local/debugger/rules.py).

The tensors come from real training processes: a tiny torch loop that creates its hook exactly as
``training/train.py`` does (``smdebug.pytorch.Hook.create_from_json_file`` with the config written by
``write_hook_config``, found through the env it returns), run as a subprocess like the local engine runs jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.local.debugger import hooks as debugger
from pipelines.local.debugger.rules import RuleParameterError, low_gpu_utilization

ROOT = Path(__file__).resolve().parents[1]

# Collections as the pipeline's best-model training step configures them (save every step of train and eval).
HOOK_CONFIG = {
    "S3OutputPath": "s3://mlops-local/debug-output",
    "HookParameters": {"train.save_interval": "1", "eval.save_interval": "1"},
    "CollectionConfigurations": [
        {"CollectionName": "losses"},
        {"CollectionName": "gradients"},
        {"CollectionName": "weights"},
        {"CollectionName": "relu_input", "CollectionParameters": {"include_regex": ".*relu_input"}},
    ],
}

TINY_TRAINER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn as nn
    import smdebug.pytorch as smd

    scenario, epochs = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def clusters(n):
        y = torch.arange(n) % 3
        return torch.eye(3, 16)[y] * 2 + torch.randn(n, 16, generator=g), y

    if scenario == "overfit":  # a dozen samples with random labels; validation from the same noise
        xt, yt = torch.randn(12, 16, generator=g), torch.randint(0, 3, (12,), generator=g)
        xv, yv = torch.randn(48, 16, generator=g), torch.randint(0, 3, (48,), generator=g)
    else:
        (xt, yt), (xv, yv) = clusters(256), clusters(128)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.relu, self.fc2 = nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3)

        def forward(self, x):
            return self.fc2(self.relu(self.fc1(x)))

    model, criterion = Net(), nn.CrossEntropyLoss()
    if scenario == "overfit":
        opt, batch = torch.optim.Adam(model.parameters(), lr=0.01), 16
    else:  # 4 training and 2 validation steps per epoch
        batch = 64
        opt = torch.optim.SGD(model.parameters(), lr={"healthy": 0.05, "diverge": 50.0}[scenario], momentum=0.9)
    hook = smd.Hook.create_from_json_file()  # path from SMDEBUG_CONFIG_FILE_PATH, as in training/train.py
    hook.register_module(model)
    hook.register_loss(criterion)
    for epoch in range(epochs):
        hook.set_mode(smd.modes.TRAIN)
        model.train()
        for i in range(0, len(xt), batch):
            opt.zero_grad()
            loss = criterion(model(xt[i:i + batch]), yt[i:i + batch])
            loss.backward()
            opt.step()
        hook.set_mode(smd.modes.EVAL)
        model.eval()
        with torch.no_grad():
            for i in range(0, len(xv), batch):
                criterion(model(xv[i:i + batch]), yv[i:i + batch])
    hook.close()
    """
)

SCENARIOS = {"healthy": 4, "diverge": 4, "overfit": 30}


def _request(debug_rules: list[dict], profiler_rules: list[dict] | None = None) -> dict:
    return {
        "DebugHookConfig": HOOK_CONFIG,
        "DebugRuleConfigurations": debug_rules,
        "ProfilerRuleConfigurations": profiler_rules or [],
        "ProfilerConfig": {"S3OutputPath": "s3://mlops-local/profiler", "ProfilingIntervalInMilliseconds": 500},
    }


def _rule(name: str, **params: str) -> dict:
    return {
        "RuleConfigurationName": name,
        "RuleEvaluatorImage": "503895931360.dkr.ecr.us-east-1.amazonaws.com/sagemaker-debugger-rules:latest",
        "RuleParameters": {"rule_to_invoke": name, **params},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One job dir per scenario, trained in parallel subprocesses with the env from write_hook_config."""
    base = tmp_path_factory.mktemp("debugger-jobs")
    script = base / "tiny_trainer.py"
    script.write_text(TINY_TRAINER)
    procs = {}
    for scenario, epochs in SCENARIOS.items():
        job_dir = base / scenario
        env_extra = debugger.write_hook_config(_request([]), job_dir)
        env = {**os.environ, **env_extra, "SMDEBUG_LOG_LEVEL": "warning", "OMP_NUM_THREADS": "1"}
        procs[scenario] = (
            job_dir,
            subprocess.Popen(
                [sys.executable, str(script), scenario, str(epochs)],
                cwd=job_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ),
        )
    out = {}
    for scenario, (job_dir, proc) in procs.items():
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{scenario} trainer failed:\n{output[-3000:]}"
        out[scenario] = job_dir
    return out


# ---------------------------------------------------------------------------------------------------------------
# hook config


@pytest.mark.fast
def test_write_hook_config_writes_sagemaker_file_and_env(tmp_path: Path) -> None:
    env = debugger.write_hook_config(_request([]), tmp_path)
    config_path = tmp_path / "input" / "config" / "debughookconfig.json"
    assert env["SMDEBUG_CONFIG_FILE_PATH"] == str(config_path)
    config = json.loads(config_path.read_text())
    assert config["LocalPath"] == str(tmp_path / "output" / "tensors")
    assert config["HookParameters"] == {"train.save_interval": "1", "eval.save_interval": "1"}
    assert [c["CollectionName"] for c in config["CollectionConfigurations"]] == [
        "losses", "gradients", "weights", "relu_input"
    ]
    # smdebug's own framework profiler is kept off through its config-path env var
    profiler_cfg = Path(env["SMPROFILER_CONFIG_PATH"])
    assert json.loads(profiler_cfg.read_text()) == {"DisableProfiler": True}

    # smdebug parses what we wrote into the collections and save intervals we asked for
    from smdebug.core.json_config import collect_hook_config_params, get_json_config_as_dict

    parsed = collect_hook_config_params(get_json_config_as_dict(str(config_path)))
    assert parsed["out_dir"] == str(tmp_path / "output" / "tensors")


@pytest.mark.fast
def test_write_hook_config_without_debugger_and_with_unresolved_values(tmp_path: Path) -> None:
    assert debugger.write_hook_config({"AlgorithmSpecification": {}}, tmp_path) == {}
    assert not (tmp_path / "input").exists()
    bad = {"DebugHookConfig": {"HookParameters": {"save_interval": {"Get": "Parameters.Interval"}}}}
    with pytest.raises(ValueError, match="unresolved"):
        debugger.write_hook_config(bad, tmp_path)


@pytest.mark.fast
def test_write_hook_config_moves_previous_tensors_aside(tmp_path: Path) -> None:
    old = tmp_path / "output" / "tensors"
    old.mkdir(parents=True)
    (old / "training_job_end.ts").write_text("1")
    debugger.write_hook_config(_request([]), tmp_path)
    assert not any((tmp_path / "output" / "tensors").iterdir())
    moved = [p for p in (tmp_path / "output").iterdir() if p.name.startswith("tensors.previous-")]
    assert len(moved) == 1 and (moved[0] / "training_job_end.ts").exists()


# ---------------------------------------------------------------------------------------------------------------
# rules on real tensors


def _by_name(statuses: list[dict]) -> dict[str, dict]:
    return {s["RuleConfigurationName"]: s for s in statuses}


LOSS_RULE_PARAMS = {"mode": "TRAIN", "num_steps": "4"}  # 4 train steps per epoch: compare the same batch


@pytest.mark.slow
def test_loss_not_decreasing_flags_a_diverging_run_and_passes_a_healthy_one(runs: dict[str, Path]) -> None:
    rules = [_rule("LossNotDecreasing", **LOSS_RULE_PARAMS)]
    diverged = debugger.evaluate_rules(_request(rules), runs["diverge"])
    healthy = debugger.evaluate_rules(_request(rules), runs["healthy"])
    assert diverged[0]["RuleEvaluationStatus"] == "IssuesFound", diverged
    assert "learning-rate" in diverged[0]["StatusDetails"]
    assert healthy[0]["RuleEvaluationStatus"] == "NoIssuesFound", healthy
    for status in (*diverged, *healthy):
        assert set(status) == {"RuleConfigurationName", "RuleEvaluationStatus", "StatusDetails", "LastModifiedTime"}
    # smdebug's own log lines land in the job's rule log, as a rule job's CloudWatch stream would hold them.
    rule_log = (runs["diverge"] / debugger.RULES_LOG).read_text()
    assert "Started execution of rule LossNotDecreasing" in rule_log


@pytest.mark.slow
def test_overfit_trips_on_tiny_training_set_only(runs: dict[str, Path]) -> None:
    rules = [_rule("Overfit")]
    overfit = debugger.evaluate_rules(_request(rules), runs["overfit"])[0]
    healthy = debugger.evaluate_rules(_request(rules), runs["healthy"])[0]
    assert overfit["RuleEvaluationStatus"] == "IssuesFound", overfit
    assert "ratio_threshold" in overfit["StatusDetails"]
    assert healthy["RuleEvaluationStatus"] == "NoIssuesFound", healthy


@pytest.mark.slow
def test_overfit_reads_its_documented_parameters(runs: dict[str, Path]) -> None:
    """AWS's Overfit takes tensor_regex, start_step, patience, ratio_threshold; patience_train and
    patience_validation are Overtraining's and make the rule report Error instead of silently using defaults."""
    def named(name: str, **params: str) -> dict:
        return {**_rule("Overfit", **params), "RuleConfigurationName": name}

    statuses = _by_name(debugger.evaluate_rules(_request([
        named("Patience2", patience="2"),
        named("VeryPatient", patience="1000"),
        named("StartsAfterTheEnd", start_step="1000000"),
        named("HighThreshold", ratio_threshold="1e12"),  # its training loss gets near 0: huge ratios
        named("OvertrainingNames", patience_train="5", patience_validation="10"),
    ]), runs["overfit"]))
    assert statuses["Patience2"]["RuleEvaluationStatus"] == "IssuesFound", statuses["Patience2"]
    assert "for 2 validation pass(es)" in statuses["Patience2"]["StatusDetails"]
    for name in ("VeryPatient", "StartsAfterTheEnd", "HighThreshold"):
        assert statuses[name]["RuleEvaluationStatus"] == "NoIssuesFound", statuses[name]
    wrong = statuses["OvertrainingNames"]
    assert wrong["RuleEvaluationStatus"] == "Error"
    assert "Overfit has no parameter patience_train, patience_validation" in wrong["StatusDetails"]


@pytest.mark.slow
def test_the_pipelines_own_rule_parameters_run_locally(runs: dict[str, Path]) -> None:
    """Every Debugger rule exactly as the definition configures it (pipelines.pipeline.DEBUGGER_RULES) is
    accepted by its local implementation."""
    from sagemaker.debugger import Rule

    from pipelines.pipeline import DEBUGGER_RULES

    configs = [Rule.sagemaker(factory(), name=name, rule_parameters=dict(params)).to_debugger_rule_config_dict()
               for name, (factory, params, _) in DEBUGGER_RULES.items()]
    statuses = debugger.evaluate_rules(_request(configs), runs["healthy"])
    assert {s["RuleConfigurationName"] for s in statuses} == set(DEBUGGER_RULES)
    assert not [s for s in statuses if s["RuleEvaluationStatus"] == "Error"], statuses


@pytest.mark.slow
def test_other_rules_and_errors_on_the_healthy_run(runs: dict[str, Path]) -> None:
    request = _request(
        [
            _rule("VanishingGradient"),
            _rule("VanishingGradient", threshold="1000"),  # every gradient is "vanishing" below 1000
            _rule("Overtraining", patience_train="1000", patience_validation="1000"),
            _rule("PoorWeightInitialization"),
            {**_rule("PoorWeightInitialization", distribution_range="1000"), "RuleConfigurationName": "PWIStrict"},
            _rule("LossNotDecreasing", num_steps="abc"),
            {"RuleConfigurationName": "MyCustom", "RuleParameters": {"rule_to_invoke": "DeadRelu"}},
        ],
        [_rule("LowGPUUtilization")],
    )
    request["DebugRuleConfigurations"][1]["RuleConfigurationName"] = "VanishingGradientStrict"
    by_kind = debugger.evaluate_rules_by_kind(request, runs["healthy"])
    statuses = _by_name(by_kind["DebugRuleEvaluationStatuses"])
    assert statuses["VanishingGradient"]["RuleEvaluationStatus"] == "NoIssuesFound"
    assert statuses["VanishingGradientStrict"]["RuleEvaluationStatus"] == "IssuesFound"
    assert statuses["Overtraining"]["RuleEvaluationStatus"] == "NoIssuesFound"
    assert statuses["PoorWeightInitialization"]["RuleEvaluationStatus"] == "NoIssuesFound"
    assert statuses["PWIStrict"]["RuleEvaluationStatus"] == "IssuesFound"  # every gradient spread is < 1000
    assert "distribution_range" in statuses["PWIStrict"]["StatusDetails"]
    assert statuses["LossNotDecreasing"]["RuleEvaluationStatus"] == "Error"
    assert "num_steps" in statuses["LossNotDecreasing"]["StatusDetails"]
    assert statuses["MyCustom"]["RuleEvaluationStatus"] == "Error"
    assert "DeadRelu" in statuses["MyCustom"]["StatusDetails"]
    gpu = by_kind["ProfilerRuleEvaluationStatuses"][0]
    assert gpu["RuleEvaluationStatus"] == "NoIssuesFound" and "No GPU" in gpu["StatusDetails"]


@pytest.mark.slow
def test_overtraining_trips_when_training_loss_stalls(runs: dict[str, Path]) -> None:
    # The over-fitting run drives its training loss to ~0 early, then stalls below delta.
    status = debugger.evaluate_rules(_request([_rule("Overtraining", delta="0.01")]), runs["overfit"])[0]
    assert status["RuleEvaluationStatus"] == "IssuesFound", status


@pytest.mark.slow
def test_rules_in_the_sagemaker_sdk_shape(runs: dict[str, Path]) -> None:
    """RuleParameters exactly as sagemaker.debugger.Rule.sagemaker(rule_configs...) puts them in a definition."""
    from sagemaker.debugger import ProfilerRule, Rule, rule_configs

    debug = [
        Rule.sagemaker(rule_configs.loss_not_decreasing(), rule_parameters=LOSS_RULE_PARAMS),
        Rule.sagemaker(rule_configs.overfit()),
    ]
    profiler = [ProfilerRule.sagemaker(rule_configs.LowGPUUtilization())]
    request = _request(
        [r.to_debugger_rule_config_dict() for r in debug], [r.to_profiler_rule_config_dict() for r in profiler]
    )
    statuses = _by_name(debugger.evaluate_rules(request, runs["healthy"]))
    assert {s["RuleEvaluationStatus"] for s in statuses.values()} == {"NoIssuesFound"}, statuses
    assert set(statuses) == {"LossNotDecreasing", "Overfit", "LowGPUUtilization"}


@pytest.mark.fast
def test_missing_tensors_give_error_not_crash(tmp_path: Path) -> None:
    statuses = debugger.evaluate_rules(_request([_rule("LossNotDecreasing")]), tmp_path)
    assert statuses[0]["RuleEvaluationStatus"] == "Error"
    assert "no Debugger tensors" in statuses[0]["StatusDetails"]


# ---------------------------------------------------------------------------------------------------------------
# LowGPUUtilization on synthetic system metrics


@pytest.mark.fast
def test_low_gpu_utilization_thresholds() -> None:
    idle = [{"gpu_utilization": 5.0}] * 40
    busy = [{"gpu_utilization": 95.0}] * 40
    params = {"window": "10", "patience": "5"}
    assert low_gpu_utilization(idle, params).triggered
    assert not low_gpu_utilization(busy, params).triggered
    spiky = [{"gpu_utilization": 99.0 if i % 2 else 0.0} for i in range(40)]
    finding = low_gpu_utilization(spiky, params)
    assert finding.triggered and "fluctuating in" in finding.detail
    cpu_only = low_gpu_utilization([{"gpu_utilization": None, "cpu_percent": 50}] * 10, {})
    assert not cpu_only.triggered and "No GPU" in cpu_only.detail
    with pytest.raises(RuleParameterError, match="window"):
        low_gpu_utilization(idle, {"window": "ten"})
