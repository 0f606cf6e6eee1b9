"""Two aggregated vLLM workers + the KV-aware router + the OpenAI frontend, on one machine.

python examples/aggregated.py [--model DIR] [--port 8080]
"""

from _run import main

if __name__ == "__main__":
    main(aggregated=2, prefill=0, decode=0, description=__doc__)
