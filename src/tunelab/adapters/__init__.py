"""Parameter-efficient adapters: one module per method, one interface (see docs/architecture.md).

    from tunelab.adapters import get_method
    method = get_method("lora")                  # the tunelab.adapters.lora module
    report = method.wrap(model, method.Config(r=16, target_modules="all-linear"))
    print(report.summary())                      # lora: 196 modules, trainable ... (…%)
    with method.disabled(model): ...             # the frozen base model (DPO reference)
    method.merge(model); model.save_pretrained(out)
"""

from .base import (AdapterReport, adapter_state_dict, disabled, get_method, has_adapter,  # noqa: F401
                   load_adapter_state_dict, merge, method_names, set_enabled)
