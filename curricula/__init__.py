"""What data, in what order: tasks, vocabulary, curriculum schema, YAML, data sets, sampler."""
