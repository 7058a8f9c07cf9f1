"""Run the reference payment agent (`python -m billing.agent …`), but die (exit 7) the moment
it would send its first callback: it has received the request, decided, written the decision
to its state file and answered CityGrid, and CityGrid has not heard the outcome — the payment
crash test's fault, injected from outside the production code.

    python tests/payment_agent_crash.py --port P --secret-env VAR --state FILE
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from billing import agent  # noqa: E402


def _dies_before_calling_back(self, record):
    sys.stderr.write(f"crashing before the callback of {record['request']}\n")
    sys.stderr.flush()
    os._exit(7)


agent.Agent.call_back = _dies_before_calling_back

sys.exit(agent.main(sys.argv[1:]))
