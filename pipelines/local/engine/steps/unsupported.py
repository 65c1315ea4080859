"""Step kinds the engine knows but cannot run on one machine: each fails when it is reached, saying why, and the
steps that do not depend on it run (a definition holding one is accepted, as SageMaker accepts it)."""

from __future__ import annotations

from pipelines.local.engine.steps.base import Unsupported


class Callback(Unsupported):
    type_name = "Callback"
    reason = ("a CallbackStep sends its token to an SQS queue and waits for SendPipelineExecutionStepSuccess/Failure; "
              "the local AWS service has no SQS")


class EMR(Unsupported):
    type_name = "EMR"
    reason = "an EMRStep runs on an Amazon EMR cluster (AddJobFlowSteps); the local AWS service has no EMR"


class ClarifyCheck(Unsupported):
    type_name = "ClarifyCheck"
    reason = ("a ClarifyCheckStep runs SageMaker Clarify's container (bias/explainability), whose analysis code is "
              "not available as a package to run locally")


class QualityCheck(Unsupported):
    type_name = "QualityCheck"
    reason = ("a QualityCheckStep runs the Model Monitor analyzer container (Deequ on Spark), which does not run "
              "without its image")


class AutoML(Unsupported):
    type_name = "AutoML"
    reason = "an AutoMLStep runs SageMaker Autopilot, a managed service"
