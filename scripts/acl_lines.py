#!/usr/bin/env python
"""Print the Redis ACL user lines of the deployment manifests, made from the rules ``fuseflow stack up`` gives
its roles (``fuseflow.wire.redis_streams.run_acl_rules``): paste them into the Redis start script of
deploy/k8s/base/redis.yaml (as printed) or of deploy/docker/docker-compose.yml (``--compose``: ``$`` written
``$$``, as compose wants). tests/deploy/test_redis_acl.py checks both files hold exactly these lines.

    python scripts/acl_lines.py [--compose]
"""

from __future__ import annotations

import sys

from fuseflow.wire.redis_streams import ROLE_COMMANDS, run_acl_rules

RUN_VAR = "$FUSEFLOW_RUN"  # the run name, from the container's environment


def acl_lines(dollar: str = "$") -> list[str]:
    """One ``printf`` per role: ``user <role> on >$REDIS_<ROLE>_PASSWORD <rules for run $FUSEFLOW_RUN>``."""
    lines = []
    for role in ROLE_COMMANDS:
        rules = run_acl_rules("RUN", role).replace("{RUN}", "{" + RUN_VAR + "}")
        line = f"printf 'user {role} on >%s %s\\n' \"$REDIS_{role.upper()}_PASSWORD\" \"{rules}\";"
        lines.append(line.replace("$", dollar))
    return lines


if __name__ == "__main__":
    print("\n".join(acl_lines("$$" if "--compose" in sys.argv[1:] else "$")))
