"""OpenAI-compatible frontend: tokenizes, asks the router, forwards, disaggregates, migrates."""
