"""Where a benchmark's numbers go: ``OUT/results.json`` (every number) and, with a table, ``OUT/table.md``."""

from __future__ import annotations

import argparse
import os

from palu_ds.atomic import write_json, write_text


def write_results(out_dir: str | os.PathLike, results: dict, table: str | None = None) -> None:
    """Print ``table`` (when given) and write it to ``out_dir/table.md``; write ``results`` to
    ``out_dir/results.json``. Each file is written atomically (a failure leaves the previous one)."""
    if table is not None:
        print(table)
        write_text(os.path.join(out_dir, "table.md"), table + "\n")
    write_json(os.path.join(out_dir, "results.json"), results)


def bench_parser(doc: str, out: str, steps: int, tofu: bool = False,
                 skip_train: bool = False) -> argparse.ArgumentParser:
    """The arguments of a speed benchmark: ``--out`` (its folder), ``--steps`` (timed optimizer steps), with ``tofu``
    ``--tofu`` (the folder of TOFU's jsonl files, default the checkout's sibling ../shared/data/tofu), with
    ``skip_train`` ``--skip-train`` (reuse the training runs' results)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if skip_train:
        p.add_argument("--skip-train", action="store_true")
    if tofu:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        p.add_argument("--tofu", default=os.path.join(root, "..", "shared", "data", "tofu"))
    p.add_argument("--out", default=out)
    p.add_argument("--steps", type=int, default=steps)
    return p


def parse_bench(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The parsed arguments of a :func:`bench_parser`, its ``--out`` folder made."""
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    return a


def tb_scalars(out_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run wrote to ``out_dir/tensorboard`` (rank 0's): tag -> [(step, value), ...] in step order;
    ``{}`` when the run wrote none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = os.path.join(out_dir, "tensorboard")
    if not os.path.isdir(tb):
        return {}
    acc = EventAccumulator(tb, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
