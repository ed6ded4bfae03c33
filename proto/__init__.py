"""The one wire contract between services: subjects, streams, KV buckets and message types.

Services import this package and nothing else from each other. Everything on the bus is a
msgspec Struct from here, encoded as JSON (readable with the `nats` CLI).
"""

from proto.messages import *  # noqa: F403
from proto.record_keys import *  # noqa: F403
from proto.subjects import *  # noqa: F403
