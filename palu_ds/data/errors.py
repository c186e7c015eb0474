"""One error type for bad input data: it always names where (file, row, field) and what to do."""


class DataError(ValueError):
    """Bad input data. The message names the file, the row and the field, and what to do about it."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str, fix: str = ""):
        where = f"{source}" + (f", row {row}" if row is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}" + (f" -- {fix}" if fix else ""))
        self.source, self.row, self.field = source, row, field
