"""Datasets: the :class:`EditRecord` type and the per-schema loaders that produce it."""

from editlab.data.loaders import (
    ChoiceItem,
    load_counterfact_easyedit,
    load_counterfact_rome,
    load_knowedit,
    load_piqa,
    load_wikibio,
    load_zsre_mend,
    resolve_data_dir,
)
from editlab.data.records import EditRecord, Probe, RecordError

__all__ = [
    "EditRecord",
    "Probe",
    "RecordError",
    "resolve_data_dir",
    "load_counterfact_rome",
    "load_counterfact_easyedit",
    "load_zsre_mend",
    "load_knowedit",
    "load_wikibio",
    "ChoiceItem",
    "load_piqa",
]
