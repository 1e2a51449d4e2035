"""How a model is made trainable: one module per method, one interface (base.py; docs/architecture.md).

What lives here:

* base.py — the method interface, the helpers every method shares (`AdapterModule`, `merge`, `disabled`,
  adapter state dicts), the method registry (`get_method`), and the calls a run makes by method name
  (`apply_method`, `check_method_data`, `saves_full_model`, `export_method`, `load_method`, `batch_context`);
* one module per method: full.py, lora.py, dora.py, qlora.py (+ nf4.py, the 4-bit code), mora.py, loreft.py
  (+ loreft_positions.py), partial.py (`freeze`); extras.py: modules trained fully next to an adapter;
* targets.py — target patterns and the "all-linear" preset;
* on-disk formats: peft_format.py (PEFT's, for lora/dora/qlora), native_format.py (tunelab's own, for mora,
  loreft, freeze: the one module that reads and writes `tunelab_adapter.json` + safetensors);
* init_from.py — `lora.init_from` (dora, qlora too): a saved LoRA-family adapter's weights loaded before step 0.

What it may import: the standard library, torch, pydantic, safetensors, transformers (through the model it
is given), `tunelab.errors`, and `tunelab.models.load.ecosystem_ref` (peft_format, for the base-model id PEFT
resolves). Nothing from tunelab.config (which imports the methods' Config classes), data/, objectives/,
train/, eval/, lab/ or the CLI: those call in here, never the other way round.

    from tunelab.adapters import apply_method, batch_context, export_method
    report = apply_method(model, "lora", {"r": 16, "target_modules": "all-linear"})
    print(report.summary())                      # lora: 196 modules, trainable ... (…%)
    with disabled(model): ...                    # the frozen base model (DPO reference)
    with batch_context(model, batch): ...        # a scoring forward (objectives.logprobs does this)
    export_method(model, "lora", None, out)      # PEFT folder; merge(model) for a plain HF model instead
"""

from .base import (AdapterReport, adapter_state_dict, apply_method, batch_context, check_method_data,  # noqa: F401
                   disabled, export_method, get_method, has_adapter, load_adapter_state_dict, load_method, merge,
                   method_names, saves_full_model, set_enabled)
