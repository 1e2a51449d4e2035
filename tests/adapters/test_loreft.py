"""LoReFT: which positions/layers change, R orthonormal through training, parameter count, save/load,
generation with the KV cache, merge refused, gradient checkpointing; training intervenes on the same prompt
positions as generation whatever the masking mode (packed rows per document), plain-text data refused."""

import pytest
import torch
from adapter_helpers import VOCAB, batch, logits, make, perturb
from pydantic import ValidationError

from tunelab.adapters import base, loreft, loreft_positions, native_format
from tunelab.errors import TunelabError
from tunelab.objectives.sft import SFT


def sft_batch(ids, prompt_len):
    """One unpacked batch whose tokens from `prompt_len` on are the trained response."""
    B, T = ids.shape
    loss = torch.zeros(B, T, dtype=torch.bool)
    loss[:, prompt_len:] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss,
            "position_ids": torch.arange(T).expand(B, T), "seq_ids": torch.zeros_like(ids)}


def block_outputs(model, fn):
    outs, hooks = {}, []
    for i, blk in enumerate(model.model.layers):
        hooks.append(blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.detach().clone())))
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_prompt_locations_caps_and_packing():
    f = lambda seq, pm, a, b: loreft.prompt_locations(torch.tensor([seq]), None if pm is None  # noqa: E731
                                                      else torch.tensor([pm], dtype=torch.bool), a, b)[0].tolist()
    # 6 prompt tokens, f2+l2; response tokens and padding never intervened
    assert f([0] * 8 + [-1], [1] * 6 + [0, 0, 0], 2, 2) == [1, 1, 0, 0, 2, 2, 0, 0, 0]
    # short prompt (P=5) with f7+l7: no overlap, ⌈P/2⌉ first / rest last
    assert f([0] * 7, [1] * 5 + [0, 0], 7, 7) == [1, 1, 1, 2, 2, 0, 0]
    # one side only takes the whole prompt when it fits; the other side's leftover is given back
    assert f([0] * 5, None, 7, 0) == [1] * 5 and f([0] * 5, None, 0, 7) == [2] * 5
    assert f([0] * 5, None, 1, 7) == [1, 2, 2, 2, 2]
    # packed row: each document has its own prompt; left padding shifts the start
    assert f([-1, 0, 0, 0, 0, 1, 1, 1, 1, -1], [0, 1, 1, 0, 0, 1, 1, 1, 0, 0], 1, 1) == \
        [0, 1, 2, 0, 0, 1, 0, 2, 0, 0]
    # batches without a prompt mask: each document's tokens before its first loss token
    seq = torch.tensor([[-1, 0, 0, 0, 0, 1, 1, 1, 1, -1]])
    lm = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 1, 0]], dtype=torch.bool)
    assert loreft_positions.prompt_before_loss(seq, lm)[0].long().tolist() == [0, 1, 1, 0, 0, 1, 1, 1, 0, 0]
    # a document without any prompt token cannot be intervened on
    with pytest.raises(TunelabError, match="no prompt"):
        f([0, 0, 1, 1], [1, 0, 0, 0], 1, 1)


def test_decoding_step_detection_across_transformers_versions():
    """A forward continuing a KV cache is a decoding step, whatever the cache keyword is called: `cache`
    (transformers 5.x) or `past_key_values` (before); or when a 2-D mask is longer than the new tokens."""
    from transformers import DynamicCache

    from tunelab.models.tiny import tiny_config

    cache = DynamicCache(config=tiny_config("llama", vocab_size=VOCAB))
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    empty = DynamicCache(config=tiny_config("llama", vocab_size=VOCAB))
    for name in loreft_positions.CACHE_KEYS:
        assert loreft_positions.continues_cache({name: cache}, 1)
        assert not loreft_positions.continues_cache({name: empty}, 3)
    legacy = ((torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16)),)
    assert loreft_positions.continues_cache({"past_key_values": legacy}, 1)
    assert loreft_positions.continues_cache({"attention_mask": torch.ones(2, 4)}, 1)
    assert not loreft_positions.continues_cache({"attention_mask": torch.ones(2, 4)}, 4)


@pytest.mark.parametrize("layers", [[0], [1]])
def test_only_chosen_positions_and_layers_change(layers):
    ids = batch(t=12)
    model = make("llama")
    loreft.wrap(model, {"layers": layers, "positions": "f2+l3", "r": 4})
    b = sft_batch(ids, prompt_len=8)

    def plain():
        with loreft.disabled(model):
            model(input_ids=ids)

    def intervened():
        with loreft.batch_context(model, b):
            model(input_ids=ids)

    base_out, new_out = block_outputs(model, plain), block_outputs(model, intervened)
    chosen = torch.zeros(12, dtype=torch.bool)
    chosen[[0, 1, 5, 6, 7]] = True  # first 2 and last 3 of the 8 prompt tokens
    li = layers[0]
    for i in range(li):  # blocks before the intervened one: bit-identical
        torch.testing.assert_close(new_out[i], base_out[i], atol=0, rtol=0)
    changed = (new_out[li] - base_out[li]).abs().amax(-1) > 0
    assert changed.equal(chosen.expand(2, 12))
    # auto mode (no batch_context, empty cache): the whole input is the prompt → last 3 of all 12 tokens
    auto = block_outputs(model, lambda: model(input_ids=ids))
    auto_changed = (auto[li] - base_out[li]).abs().amax(-1) > 0
    assert auto_changed[0].nonzero().flatten().tolist() == [0, 1, 9, 10, 11]


def test_parameter_count_and_base_untouched():
    model = make("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d, r = model.config.hidden_size, 4
    rep = loreft.wrap(model, {"r": r, "positions": "f3+l3"})
    assert rep.trainable == 2 * 2 * (2 * r * d + r)  # 2 blocks × (prefix, suffix)
    model2 = make("llama")
    assert loreft.wrap(model2, {"r": r, "share_weights": True}).trainable == 2 * (2 * r * d + r)
    assert loreft.wrap(make("llama"), {"r": r, "positions": "l5"}).trainable == 2 * (2 * r * d + r)
    for k, v in model.state_dict().items():  # base weights: same keys, same values, frozen
        if ".loreft." not in k:
            assert torch.equal(v, before[k])
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".loreft." not in n)


def test_R_stays_orthonormal_through_training_with_weight_decay():
    ids = batch(t=12)
    model = make("llama")
    loreft.wrap(model, {"r": 4, "positions": "f3+l3"})
    obj = SFT()
    b = sft_batch(ids, 6)
    mods = [m for _, m in base.adapter_modules(model)]
    start = [m.R.detach().clone() for m in mods]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.5)
    model.train()
    for _ in range(8):
        ls, n, _ = obj.loss(model, b)
        (ls / n).backward()
        opt.step()
        opt.zero_grad()
    moved = 0
    for m, r0 in zip(mods, start):
        R = m.R.detach()
        assert torch.linalg.matrix_norm(R @ R.T - torch.eye(4)) < 1e-5
        moved += not torch.allclose(R, r0)
    # the last block's prefix edit reaches no loss token (only the head reads the last block), so 3 of 4 move
    assert moved == 3


def test_save_load_identical_and_merge_refused(tmp_path):
    ids = batch(t=10)
    model = make("gemma")
    cfg = loreft.LoreftConfig(layers=[1], positions="f2+l2", r=3, share_weights=True)
    loreft.wrap(model, cfg)
    perturb(model)
    b = sft_batch(ids, 6)
    with loreft.batch_context(model, b):
        want = logits(model, ids)
    want_auto = logits(model, ids)
    out = loreft.export(model, cfg, tmp_path / "ad")
    meta, tensors = native_format.load_native(out, "loreft")
    assert meta["config"]["layers"] == [1] and meta["hidden_size"] == model.config.hidden_size
    R = tensors["model.layers.1.loreft.shared.R"]
    torch.testing.assert_close(R @ R.T, torch.eye(3), atol=1e-5, rtol=0)
    back = make("gemma")
    loreft.load(back, out)
    with loreft.batch_context(back, b):
        torch.testing.assert_close(logits(back, ids), want, atol=0, rtol=0)
    torch.testing.assert_close(logits(back, ids), want_auto, atol=0, rtol=0)
    with pytest.raises(TunelabError, match="loreft cannot be merged"):
        loreft.merge(back)
    with pytest.raises(TunelabError, match="loreft cannot be merged"):
        base.merge(back)  # the generic path `tunelab export --merged` takes
    with loreft.disabled(back):
        torch.testing.assert_close(logits(back, ids), logits(make("gemma"), ids), atol=0, rtol=0)


def test_generation_with_kv_cache_equals_no_cache_reference():
    model = make("llama")
    loreft.wrap(model, {"r": 4, "positions": "f2+l2"})
    perturb(model, scale=0.5)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (7, 4)]
    # batched, left-padded, KV cache: the prefill is intervened, decoding steps are not
    T = max(len(p) for p in prompts)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             pad_token_id=0, use_cache=True)
    for i, p in enumerate(prompts):
        seq = p.unsqueeze(0)
        for _ in range(5):  # no cache: full recompute, prompt positions intervened, generated ones not
            with torch.no_grad(), loreft.batch_context(model, sft_batch(seq, len(p))):
                nxt = model(input_ids=seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
        assert out[i, T:].tolist() == seq[0, len(p):].tolist()
    with torch.no_grad(), loreft.disabled(model):  # and the intervention does matter here
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, out)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the loop calls gradient_checkpointing_enable too
def test_gradient_checkpointing_gives_the_same_gradients():
    ids = batch(t=12)
    grads = []
    for ckpt in (False, True):
        model = make("llama")
        torch.manual_seed(0)
        loreft.wrap(model, {"r": 4, "positions": "f3+l3", "dropout": 0.1})
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(1)
        ls, n, _ = SFT().loss(model, sft_batch(ids, 6))
        ls.backward()
        grads.append({k: p.grad.clone() for k, p in base.adapter_parameters(model).items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


def test_config_validation():
    assert loreft.parse_positions("f7+l7") == (7, 7) and loreft.parse_positions("l3") == (0, 3)
    for bad in ("x3", "f0", "f7+", "7", ""):
        with pytest.raises(ValidationError):
            loreft.LoreftConfig(positions=bad)
    with pytest.raises(ValidationError):
        loreft.LoreftConfig(layers=[])
    with pytest.raises(TunelabError, match="block 5 does not exist"):
        loreft.wrap(make(), {"layers": [5]})
    with pytest.raises(TunelabError, match="not a tunelab loreft adapter"):
        loreft.load(make(), "/nonexistent")


# ---------------------------------------------------------- prompt positions on real encoded data
CHAT = [{"role": "user", "content": "Name three primary colours, please."},
        {"role": "assistant", "content": "Red, yellow and blue."}]
CHAT2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def chat_model():
    """A tiny Llama with the SmolLM2 vocabulary and random f2+l3 interventions."""
    from tunelab.models.tiny import tiny_model

    model = tiny_model("llama").eval()
    loreft.wrap(model, {"r": 4, "positions": "f2+l3"})
    perturb(model, scale=0.5)
    return model


def forward_codes(model, fn) -> list:
    """The intervention codes of every decoder-body forward during fn() (None: not intervened)."""
    seen = []
    h = model.model.register_forward_hook(lambda m, a, o: seen.append(loreft._state(model).current))
    try:
        with torch.no_grad():
            fn()
    finally:
        h.remove()
    return seen


def generation_codes(model, tokenizer, template, conversation) -> torch.Tensor:
    """Codes of the prefill when generating the conversation's last answer; checks decoding is untouched."""
    text = template.generation_prompt(conversation[:-1])
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    seen = forward_codes(model, lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                       max_new_tokens=3, do_sample=False,
                                                       pad_token_id=tokenizer.pad_token_id))
    assert len(seen) == 3 and all(c is None for c in seen[1:])  # decoding steps are not intervened
    return ids[0], seen[0][0]


@pytest.mark.parametrize("template_name", ["chatml", "tokenizer"])
@pytest.mark.parametrize("masking", ["prompt", "none", "template"])
def test_training_positions_equal_generation_positions_for_every_masking(masking, template_name, chat_model,
                                                                           tokenizer):
    from tunelab.data.collate import collate
    from tunelab.data.masking import encode
    from tunelab.data.templates import get_template

    template = get_template(template_name, tokenizer)
    gen_ids, gen_codes = generation_codes(chat_model, tokenizer, template, CHAT)
    P = len(gen_ids)
    assert gen_codes.nonzero().flatten().tolist() == [0, 1, P - 3, P - 2, P - 1]

    enc = encode(tokenizer, template.segments(CHAT), mode=masking)
    assert enc.input_ids[:P] == gen_ids.tolist() and enc.prompt_mask == [i < P for i in range(len(enc))]
    b = collate([enc], tokenizer.pad_token_id)
    seen = forward_codes(chat_model, lambda: SFT().loss(chat_model, b))
    assert len(seen) == 1
    train_codes = seen[0][0]
    assert train_codes[:P].equal(gen_codes) and not train_codes[P:].any()


def test_packed_rows_use_each_documents_own_prompt(chat_model, tokenizer):
    from tunelab.data.collate import collate
    from tunelab.data.masking import encode
    from tunelab.data.templates import get_template

    template = get_template("chatml", tokenizer)
    encs = [encode(tokenizer, template.segments(c), mode="none") for c in (CHAT, CHAT2)]
    packed = collate([encs], tokenizer.pad_token_id, packed=True, pad_to_multiple_of=64)
    seen = forward_codes(chat_model, lambda: SFT().loss(chat_model, packed))
    codes, pos = seen[0][0], 0
    for conv, enc in zip((CHAT, CHAT2), encs):
        _, gen_codes = generation_codes(chat_model, tokenizer, template, conv)
        doc = codes[pos: pos + len(enc)]
        assert doc[:len(gen_codes)].equal(gen_codes) and not doc[len(gen_codes):].any()
        pos += len(enc)
    assert not codes[pos:].any()  # padding


def test_plain_text_data_is_refused_in_one_line(chat_model, tokenizer, tmp_path, capsys):
    from tests.helpers import save_tiny_model, write_config, write_jsonl
    from tunelab.cli import main
    from tunelab.data.collate import collate
    from tunelab.data.formats import Sample
    from tunelab.data.masking import encode_dataset
    from tunelab.data.templates import get_template

    template = get_template("chatml", tokenizer)
    text = Sample(None, "Plain pretraining text has no prompt to intervene on.", "t.jsonl:1")
    chat = Sample(CHAT, None, "t.jsonl:2")
    encs, _ = encode_dataset(tokenizer, [chat, text], template)
    assert not any(encs[1].prompt_mask)
    with pytest.raises(TunelabError, match="t.jsonl:1: loreft: .* no prompt"):
        loreft.check_examples(encs)
    b = collate(encs, tokenizer.pad_token_id)
    with pytest.raises(TunelabError, match="no prompt") as e:  # a batch built around the check: refused too
        SFT().loss(chat_model, b)
    assert "\n" not in str(e.value)

    # the CLI: one line, exit status 2, nothing written
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": f"Plain text number {i}."} for i in range(8)])
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), method="loreft",
                       model={"name": str(save_tiny_model(tmp_path / "m", tokenizer))},
                       data={"train": str(data), "format": "text", "max_length": 32},
                       train={"max_steps": 1}, samples={"n_heldout": 0})
    capsys.readouterr()
    rc = main(["train", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no prompt to intervene on" in err[0], err
    assert not (tmp_path / "out").exists()
