"""Data layer: files/hub datasets → samples → templated segments → token ids + loss masks → batches.

See docs/architecture.md ("Data contracts") and each module's docstring. The batch builder lives in
`tunelab.data.collate.collate` (not re-exported here, so `tunelab.data.collate` stays the module).

May import: torch, tokenizers/transformers (tokenizers only), datasets, pyarrow, tunelab.errors,
tunelab.console; nothing from models/, adapters/, objectives/ or below. `kinds.py` turns records into each
objective family's examples and batches; `batches.py` defines the batch-source interface the loop reads.
"""

from .collate import block_causal_mask
from .formats import FORMATS, Sample, detect_format, to_sample
from .inspect import examples_json, inspect_examples, render_examples
from .masking import MODES, TURNS, DataStats, Encoded, encode, encode_dataset
from .packing import pack, packing_efficiency
from .pipeline import build_examples
from .sources import Record, load_records
from .templates import TEMPLATES, Segment, Template, get_template, sample_segments

__all__ = [
    "FORMATS", "MODES", "TEMPLATES", "TURNS", "DataStats", "Encoded", "Record", "Sample", "Segment", "Template",
    "block_causal_mask", "build_examples", "detect_format", "encode", "encode_dataset",
    "examples_json", "get_template", "inspect_examples", "load_records", "pack", "packing_efficiency",
    "render_examples", "sample_segments", "to_sample",
]
