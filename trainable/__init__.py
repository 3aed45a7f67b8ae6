"""How one trial trains: model, training loop over stages, evaluation, probes, compute."""
