"""Engine plugins: translate between an engine and the dynamo-ext protocol, nothing else."""
