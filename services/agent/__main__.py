"""python -m services.agent --config config.yaml [--nats URL] [--host-id ID]"""

import sys

from lls.service import main
from services.agent.runtime_choice import StartupError
from services.agent.service import run

try:
    main("agent", run)
except StartupError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
