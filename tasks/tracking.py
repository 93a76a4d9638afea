"""MLflow lineage: one parent run per sweep, one child run per (dataset, method, ordering)."""
from __future__ import annotations

from pathlib import Path

from tasks.environment import configure_environment

configure_environment()

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402


def tracking_uri(db_file: Path) -> str:
    """sqlite URI with an absolute path (four slashes), as MLflow needs."""
    return f"sqlite:///{Path(db_file).resolve()}"


class SweepTracker:
    """Writes a sweep's runs to MLflow from the flow's own thread (sqlite dislikes concurrent writers)."""

    def __init__(self, db_file: Path, artifacts: Path, experiment: str):
        Path(db_file).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=tracking_uri(db_file))
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=Path(artifacts).resolve().as_uri()
        )
        self.parent_id: str | None = None

    def start_sweep(self, name: str, params: dict, tags: dict | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags or {})
        self.parent_id = run.info.run_id
        self.client.log_batch(self.parent_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return self.parent_id

    def log_run(self, summary: dict, records_file: Path) -> str:
        """A child run named dataset/method/ordering: params, accuracy, per-block accuracy by step, records."""
        name = f"{summary['dataset']}/{summary['method']}/{summary['ordering']}"
        tags = {"mlflow.parentRunId": self.parent_id, "reused": str(summary.get("reused", False)).lower()}
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        params = {k: summary[k] for k in ("dataset", "method", "method_kind", "ordering", "ordering_kind",
                                          "block_size", "fingerprint", "weights") if k in summary}
        metrics = [Metric("accuracy", summary["accuracy"], 0, 0), Metric("n", summary["n"], 0, 0),
                   Metric("seconds_per_sample", summary["seconds_per_sample"], 0, 0)]
        metrics += [Metric("block_accuracy", value, 0, step) for step, value in enumerate(summary["block_accuracy"])]
        self.client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()],
                              tags=[RunTag("run_key", name)])
        self.client.log_artifact(run_id, str(records_file), artifact_path="records")
        self.client.set_terminated(run_id)
        return run_id

    def end_sweep(self, status: str = "FINISHED", metrics: dict | None = None) -> None:
        if metrics:
            self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()])
        self.client.set_terminated(self.parent_id, status=status)


__all__ = ["SweepTracker", "mlflow", "tracking_uri"]
