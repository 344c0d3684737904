"""How commands print: a table or one JSON object per row, a summary as aligned lines or JSON."""

from __future__ import annotations

import json


def print_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    from workbench.bench import format_table

    print(format_table(rows))


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        print(f"{key:{width}s}  {text}")


def nan_to_none(value):
    """Strict JSON has no NaN: undefined scores (an AUC with one class, a constant ranking) become null."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and value != value else value
