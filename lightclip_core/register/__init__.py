"""Registration: the evaluation gate, the MLflow model version with its lineage, and the `champion` alias."""
