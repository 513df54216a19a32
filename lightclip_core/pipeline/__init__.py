"""What the Kubeflow pipeline needs from the package: its parameters (arguments.py) and the component bodies
(stages.py). The components themselves are in components/, the DAG in pipelines/full.py."""
