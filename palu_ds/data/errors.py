"""One error type for bad input data: it always names where (file, row, field) and what to do."""


class DataError(ValueError):
    """Bad input data. The message names the file, the row and the field, and what to do about it."""

    def __init__(self, source: str, row: int | str | None, field: str | None, problem: str, fix: str = ""):
        # row: where, as an editor shows it ("line 7", see :func:`at`), or a 0-based record index (shown 1-based)
        at_ = row if isinstance(row, str) else f"record {row + 1}" if row is not None else None
        where = f"{source}" + (f", {at_}" if at_ else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}" + (f" -- {fix}" if fix else ""))
        self.source, self.row, self.field = source, row, field


def at(records, i: int) -> int | str:
    """Where record ``i`` of ``records`` is: "line L" (1-based, as an editor shows it) when they came from a JSONL
    file (:class:`palu_ds.data.io.Records`), else the record index (shown 1-based by :class:`DataError`)."""
    lines = getattr(records, "lines", None)
    return f"line {lines[i]}" if lines else i
