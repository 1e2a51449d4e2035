"""`train.compile`: the compiled decoder layers give the same training step as eager (loss and updated weights),
alone and with memory mode; evaluation and generation stay eager; the option is validated like the others."""

import pytest
import torch

from tunelab.adapters.base import apply_method
from tunelab.config import TrainConfig, load_config
from tunelab.data.batches import StaticBatches
from tunelab.data.collate import collate
from tunelab.data.masking import Encoded
from tunelab.errors import TunelabError
from tunelab.models import compiling
from tunelab.models.attention import SEGMENTS_KEY
from tunelab.objectives.sft import SFT
from tunelab.train.loop import fit

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]}


def _step(tiny, tmp_path, compile_, memory_mode=False, lora=False):
    """One SGD step (lr 1) of the SFT loss: (loss, all weights after). One decoder layer and rows of one length,
    so that the compiled path needs a single graph (seconds of inductor, not minutes)."""
    g = torch.Generator().manual_seed(0)
    examples = [Encoded(ids, [False] * 3 + [True] * 9, False, 9)
                for ids in torch.randint(5, 900, (3, 12), generator=g).tolist()]
    batches = [collate(examples, pad_id=0)]
    model = tiny("llama", vocab_size=1000, layers=1)
    if lora:
        apply_method(model, "lora", LORA)
        for name, p in model.named_parameters():  # B = 0 at init: give the adapters an effect to compare
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    cfg = TrainConfig(max_steps=1, batch_size=3, optimizer="SGD", lr=1.0, max_grad_norm=None, warmup_steps=0,
                      scheduler="constant", memory_mode=memory_mode, compile=compile_)
    res = fit(model, SFT(), StaticBatches(lambda e: batches, 1), cfg, tmp_path / f"c{compile_}{memory_mode}{lora}")
    assert all("forward" not in vars(layer) for layer in model.model.layers)  # undone after training
    return res.last_loss, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.compile
@pytest.mark.parametrize("memory_mode,lora", [(False, False), (True, True)])
def test_compiled_layers_give_the_eager_step(tiny, tmp_path, memory_mode, lora):
    """Full finetuning as is; LoRA in memory mode (rows one at a time, the MLP checkpointed inside the compiled
    layer)."""
    loss_e, w_e = _step(tiny, tmp_path, False, memory_mode, lora)
    loss_c, w_c = _step(tiny, tmp_path, True, memory_mode, lora)
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    torch.testing.assert_close(w_c, w_e, rtol=1e-4, atol=1e-5)


def test_only_training_with_gradients_takes_the_compiled_path(tiny, monkeypatch):
    calls = []

    def fake(layer_class):
        def run(layer, *args, **kwargs):
            calls.append(layer)
            return layer_class.forward(layer, *args, **kwargs)
        return run

    monkeypatch.setattr(compiling, "compiled_forward", fake)
    model = tiny("llama", vocab_size=1000)
    ids = torch.randint(0, 1000, (1, 8))
    undo = compiling.compile_layers(model)
    model.train()
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == len(model.model.layers)
    with torch.no_grad():
        model(input_ids=ids)  # scoring, evaluation
    model.eval()
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # KV cache, one token at a time
    model.train()
    layer = model.model.layers[0]
    hidden = torch.randn(1, 8, layer.hidden_size, requires_grad=True)
    pos = model.model.rotary_emb(hidden, torch.arange(8)[None])
    layer(hidden, position_embeddings=pos, **{SEGMENTS_KEY: [[(0, 3), (3, 8)]]})  # per-document attention
    assert len(calls) == len(model.model.layers)
    undo()
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_compile_option_is_validated():
    assert load_config(None, ["train.compile=true"]).train.compile is True
    assert load_config(None, []).train.compile is False
    with pytest.raises(TunelabError) as e:
        load_config(None, ["train.compile=sometimes"])
    assert str(e.value).startswith("override: train.compile") and "\n" not in str(e.value)


def test_compile_refused_where_it_cannot_work(monkeypatch):
    with pytest.raises(TunelabError, match="torchrun"):
        compiling.check_compile("cpu", distributed=True)
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(TunelabError, match="C\\+\\+ compiler") as e:
        compiling.check_compile("cpu")
    assert "\n" not in str(e.value)
    compiling.check_compile("cuda")  # no C++ compiler needed there (inductor writes Triton kernels)
