"""python -m services.agent --config config.yaml [--nats URL] [--host-id ID]"""

import sys

from lls.service import main
from services.agent.service import StartupError, run

try:
    main("agent", run)
except StartupError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
