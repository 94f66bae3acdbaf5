#!/usr/bin/env python3
"""Verify one webhook with the reference Standard Webhooks library.

Herald's own signing must satisfy an independent, widely used verifier, so the
tests pipe each received webhook through the `standardwebhooks` PyPI package
(installed by scripts/install-tools.sh into $HERALD_TOOLS/venv).

stdin:  {"secret": "whsec_...", "headers": {"webhook-id": ..., "webhook-timestamp": ...,
         "webhook-signature": ...}, "body": "<raw request body>"}
stdout: "ok" and exit 0 when the signature verifies; otherwise the error on
        stderr and exit 1.
"""

import json
import sys

from standardwebhooks.webhooks import Webhook


def main() -> int:
    try:
        request = json.load(sys.stdin)
        # Called the way a receiver would call it, defaults included: the
        # library checks the 5-minute timestamp tolerance and that the body
        # parses as JSON after the signature matches.
        Webhook(request["secret"]).verify(request["body"], request["headers"])
    except Exception as error:  # the library raises several types, all a "no"
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
