"""vLLM plugin: translates between a stock vLLM engine and the dynamo-ext protocol."""
