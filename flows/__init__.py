"""Prefect flows and deployments: wiring only; the logic lives in dataprep and softrepa."""
