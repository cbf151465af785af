"""The flows' own defaults, in a module that imports nothing: ``flows.commands`` (loaded by every
``dataprep`` start) and ``flows.flows``/``flows.deployments`` (which load prefect) read them here.
The stages' defaults are their options dataclasses' and model constants."""

DEFAULT_DATA = "data/DIV2K_train_HR"
DEFAULT_OUT = "runs/div2k"
NIGHTLY = "0 2 * * *"  # 02:00 every night, in the schedule's time zone (UTC by default)
