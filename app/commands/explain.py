"""`workbench explain`: explanations of a store's features in words, scored by detection."""

from __future__ import annotations

import json

from app.commands.output import print_rows
from app.flags import config_from_args


def cmd_explain(args) -> None:
    from sae.explain import explain
    from sae.explain_config import ExplainConfig
    from workbench.store import FeatureStore

    config = config_from_args(ExplainConfig, args)
    store = FeatureStore(args.store)
    try:
        result = explain(store, config, progress=not args.quiet)
    finally:
        store.close()
    if args.json:
        for row in result.rows:
            print(json.dumps(row))
        return
    shown = [
        {
            "feature": row["feature"],
            "f1": None if row["detection"] is None else round(row["detection"]["f1"], 3),
            "n": None if row["detection"] is None else row["detection"]["n"],
            "explanation": _short(row["explanation"]),
        }
        for row in result.rows
    ]
    print_rows(shown, False)
    for line in result.notes:
        print(line)
    print(f"saved: {result.path}")


def _short(text: str, width: int = 72) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
