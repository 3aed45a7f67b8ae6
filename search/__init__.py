"""Which trials, and where they are recorded: the command line, MLflow, plots."""
