"""Prefill/decode disaggregation: 1 prefill + N decode vLLM workers (NIXL over UCX between
them), the router and the frontend, on one machine.

    python examples/disaggregated.py [--decode 1|2] [--model DIR] [--port 8080]
"""

import sys

from _run import main

if __name__ == "__main__":
    n = 1
    if "--decode" in sys.argv:
        i = sys.argv.index("--decode")
        n = int(sys.argv[i + 1])
        del sys.argv[i : i + 2]
    main(aggregated=0, prefill=1, decode=n, description=__doc__)
