#!/usr/bin/env python3
"""``make alerts``: Prefect automations that notify when a modalkit job fails or completes with failed records.

Saves a Slack webhook notification block named ``modalkit-alerts`` (``--slack-webhook-url``, or an existing
notification block's id with ``--block-id``), fills its id into ``automations/modalkit-alerts.yaml`` and creates
those automations on the server ``PREFECT_API_URL`` names (one of the same name is replaced).

    python scripts/create_alerts.py --slack-webhook-url https://hooks.slack.com/services/...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = "REPLACE-WITH-YOUR-NOTIFICATION-BLOCK-ID"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--slack-webhook-url", help="Slack incoming webhook URL (saved as block modalkit-alerts)")
    which.add_argument("--block-id", help="id of a notification block you have already")
    parser.add_argument("--file", type=Path, default=REPO / "automations" / "modalkit-alerts.yaml")
    args = parser.parse_args(argv)

    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    block_id = args.block_id
    if block_id is None:
        from prefect.blocks.notifications import SlackWebhook

        block_id = str(SlackWebhook(url=args.slack_webhook_url).save("modalkit-alerts", overwrite=True))
    text = args.file.read_text(encoding="utf-8").replace(PLACEHOLDER, block_id)
    automations = [AutomationCore.model_validate(a) for a in yaml.safe_load(text)["automations"]]
    with get_client(sync_client=True) as client:
        for automation in automations:
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            created = client.create_automation(automation)
            print(f"automation {automation.name!r}: {created}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
