"""Prefect flows. Importing this package sets Prefect's and MLflow's offline defaults before prefect loads."""
from tasks.environment import configure_environment

configure_environment()
