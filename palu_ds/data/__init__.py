"""Datasets (TOFU-style QA, MUSE-style raw text), prompt formatting, sensitive-span labelling, collation,
and the synthetic default data used by the demo and the tests."""

from palu_ds.data.errors import DataError
from palu_ds.data.io import load_records
from palu_ds.data.prompt import format_prompt
from palu_ds.data.qa import QADataset, QAOptions
from palu_ds.data.collate import collate

__all__ = ["DataError", "load_records", "format_prompt", "QADataset", "QAOptions", "collate"]
