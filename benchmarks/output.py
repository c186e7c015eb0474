"""Where a benchmark's numbers go: ``OUT/results.json`` (every number) and, with a table, ``OUT/table.md``."""

from __future__ import annotations

import os

from palu_ds.atomic import write_json, write_text


def write_results(out_dir: str | os.PathLike, results: dict, table: str | None = None) -> None:
    """Print ``table`` (when given) and write it to ``out_dir/table.md``; write ``results`` to
    ``out_dir/results.json``. Each file is written atomically (a failure leaves the previous one)."""
    if table is not None:
        print(table)
        write_text(os.path.join(out_dir, "table.md"), table + "\n")
    write_json(os.path.join(out_dir, "results.json"), results)
