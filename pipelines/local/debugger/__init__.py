"""SageMaker Debugger and Profiler for the local engine:

- :mod:`.hooks`           -- the hook/profiler configuration a training job gets, and rule evaluation after it.
- :mod:`.rules`           -- the built-in rules the pipeline attaches, on smdebug's trial API.
- :mod:`.profiler_report` -- the self-contained profiler HTML report.
"""
