"""`python -m nodeagent.supervision.stoppost --config FILE`: the agent unit's ExecStopPost,
kept light (no gRPC, no CLI tree): on every restart it runs between the old
agent and the new one, so its start-up time is part of the restart. The decision itself is `nodemesh agent stop-post`
(nodeagent/capture/removal.py)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nodeagent.supervision.stoppost")
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    if os.environ.get("SERVICE_RESULT", "") in ("", "success"):
        return 0  # a clean stop or restart: nothing to undo (the common case, so no imports)
    from nodeagent.capture.removal import after_agent_stop

    return after_agent_stop(args.config)


if __name__ == "__main__":
    sys.exit(main())
