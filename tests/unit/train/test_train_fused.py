"""The fused loss in the loop equals the dense one: value and gradients, every mode and head kind.

`distill.train.heads.micro_batch_loss` with ``fused=True`` (hidden states, the head applied per chunk,
a local teacher's head too) against ``fused=False`` (the models' full logits, `Objective.loss_sum`),
through `accumulate_gradients` as the loop calls it: the same loss sum, parts and gradients of every
trainable parameter within float32 tolerance.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distill.losses import LOSSES, SparseTargets
from distill.train import accumulate_gradients
from distill.train.examples import collate
from distill.train.objective import Objective

PAD_ROWS = 24  # the models' heads are larger than the tokenizer (padding rows), as real ones often are


def _llama(vocab: int, *, tied: bool, seed: int, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      tie_word_embeddings=tied)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _phi(vocab: int, seed: int):
    """A model whose head has a bias (Phi's ``lm_head`` is ``nn.Linear(..., bias=True)``)."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    m = PhiForCausalLM(PhiConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128, pad_token_id=0))  # fmt: skip
    assert m.lm_head.bias is not None
    with torch.no_grad():
        m.lm_head.bias.normal_()  # a bias that matters
    return m


def _examples(tok, n=5):
    from distill.demos.tasks import make_examples, to_rows

    out = []
    for i, r in enumerate(to_rows(make_examples(n, seed=3))):
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor(p + c)
        labels = torch.tensor([-100] * len(p) + c)
        out.append({"id": str(i), "input_ids": ids, "labels": labels, "prompt_len": len(p)})
    return out


def _with_topk(examples, teacher, k=5):
    """Store-like top-k rows from ``teacher``'s logits over the real vocabulary (as `distill generate` writes)."""
    n_real = teacher.config.vocab_size - PAD_ROWS
    for e in examples:
        with torch.no_grad():
            logits = teacher(input_ids=e["input_ids"][None]).logits[0, :, :n_real]
        # Row i of a store is the distribution of token i given the tokens before it.
        t = SparseTargets.from_logits(torch.cat([logits[:1], logits[:-1]]), k)
        e["topk_ids"], e["topk_logprobs"] = t.ids, t.logprobs
    return examples


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _both(objective, student, teacher, batches, on_policy=False, kd_mask=None):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    if kd_mask is not None:
        batches = [{**b, "kd_mask": kd_mask(b)} for b in batches]
    out = []
    for fused in (False, True):
        student.zero_grad(set_to_none=True)
        obj = dataclasses.replace(objective, fused=fused)
        total, parts, n = accumulate_gradients(obj, acc, student, teacher, batches, on_policy=on_policy)
        out.append((total, parts, n, _grads(student)))
    (t0, p0, n0, g0), (t1, p1, n1, g1) = out
    assert n0 == n1 > 0
    assert t1 == pytest.approx(t0, rel=1e-5, abs=1e-6)
    assert p1.keys() == p0.keys() and all(p1[k] == pytest.approx(p0[k], rel=1e-5, abs=1e-6) for k in p0)
    assert g0.keys() == g1.keys() and g0
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert max(g.abs().max().item() for g in g0.values()) > 0
    return p0


@pytest.fixture(scope="module")
def setting(tiny_tokenizer):
    v = len(tiny_tokenizer) + PAD_ROWS
    teacher = _llama(v, tied=False, seed=7, hidden=48).eval().requires_grad_(False)
    ex = _with_topk(_examples(tiny_tokenizer), teacher)
    pad = tiny_tokenizer.pad_token_id
    # Grad accumulation over unequal micro-batches; the last one holds a row of padding only.
    empty = {**ex[0], "labels": torch.full_like(ex[0]["labels"], -100)}
    batches = [collate(ex[:2], pad), collate([*ex[2:], empty], pad)]
    return {"v": v, "n_vocab": len(tiny_tokenizer), "teacher": teacher, "batches": batches}


STUDENTS = {
    "untied": lambda v: _llama(v, tied=False, seed=1),
    "tied": lambda v: _llama(v, tied=True, seed=1),
    "bias": lambda v: _phi(v, seed=1),
}


@pytest.mark.parametrize("head", sorted(STUDENTS))
def test_sft_fused_equals_dense(setting, head):
    student = STUDENTS[head](setting["v"])
    obj = Objective(mode="sft", loss="forward_kl", n_vocab=None, chunk_size=7)
    _both(obj, student, None, setting["batches"])


@pytest.mark.parametrize("head", sorted(STUDENTS))
@pytest.mark.parametrize("source", ["store", "teacher", "teacher-top5"])
def test_logits_fused_equals_dense(setting, head, source):
    student = STUDENTS[head](setting["v"])
    teacher = None if source == "store" else setting["teacher"]
    obj = Objective(mode="logits", loss="forward_kl", alpha=0.3, temperature=2.0, n_vocab=setting["n_vocab"],
                    chunk_size=16, teacher_top_k=5 if source == "teacher-top5" else 0)  # fmt: skip
    _both(obj, student, teacher, setting["batches"])


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("source", ["store", "teacher"])
def test_every_divergence_fused_equals_dense(setting, loss, source):
    student = _llama(setting["v"], tied=False, seed=2)
    teacher = None if source == "store" else setting["teacher"]
    kwargs = {"beta": 0.3} if loss == "generalized_jsd" else {"skew": 0.2} if "skew" in loss else {}
    obj = Objective(mode="logits", loss=loss, loss_kwargs=kwargs, alpha=0.6, temperature=1.5,
                    n_vocab=setting["n_vocab"], chunk_size=9)  # fmt: skip
    _both(obj, student, teacher, setting["batches"])


def test_on_policy_batches_are_pure_jsd_fused_too(setting):
    student = _llama(setting["v"], tied=True, seed=3)
    obj = Objective(mode="on-policy", loss="generalized_jsd", loss_kwargs={"beta": 0.5}, alpha=0.5,
                    n_vocab=setting["n_vocab"], chunk_size=11)  # fmt: skip
    _both(obj, student, setting["teacher"], setting["batches"], on_policy=True)


def test_rows_with_kd_masked_out_get_ce_only(setting):
    """Cross-tokenizer targets mark unaligned rows (``kd_mask`` False): CE only there, in both paths."""
    student = _llama(setting["v"], tied=False, seed=4)
    obj = Objective(mode="logits", loss="forward_kl", alpha=0.5, n_vocab=setting["n_vocab"], chunk_size=5)

    def every_third(b):
        m = torch.ones_like(b["labels"], dtype=torch.bool)
        m[:, ::3] = False
        return m

    masked = _both(obj, student, None, setting["batches"], kd_mask=every_third)
    full = _both(obj, student, None, setting["batches"])
    assert masked["kd"] < 0.8 * full["kd"] and masked["ce"] == pytest.approx(full["ce"])  # KD rows left out


@pytest.mark.parametrize("mode", ["sft", "logits"])
def test_lora_fused_equals_dense(setting, mode):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    student = get_peft_model(_llama(setting["v"], tied=False, seed=5),
                             LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))  # fmt: skip
    for n, p in student.named_parameters():  # LoRA B starts at 0: make the adapters matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    obj = Objective(mode=mode, loss="forward_kl", alpha=0.5, n_vocab=None if mode == "sft" else setting["n_vocab"],
                    chunk_size=13)  # fmt: skip
    _both(obj, student, setting["teacher"] if mode == "logits" else None, setting["batches"])


def test_the_fused_path_never_asks_the_model_for_logits(setting):
    """The head's own forward is not called (no (B, L, V) logits); its weight still gets its gradient."""
    from distill.train.heads import micro_batch_loss

    student = _llama(setting["v"], tied=False, seed=6)
    calls = []
    student.lm_head.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    obj = Objective(mode="logits", loss="forward_kl", n_vocab=setting["n_vocab"], fused=True)
    total, _ = micro_batch_loss(obj, student, setting["teacher"], setting["batches"][0], on_policy=False)
    total.backward()
    assert all(shape[-1] == 0 for shape in calls) and calls  # an empty (B, L, 0) tensor, not logits
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0


def test_collate_and_pack_carry_kd_masks_and_restart_positions(tiny_tokenizer):
    from distill.train.packing import pack_examples

    ex = _examples(tiny_tokenizer, n=3)
    for e in ex:
        e["kd_mask"] = torch.arange(len(e["input_ids"])) % 2 == 0
    lengths = [len(e["input_ids"]) for e in ex]
    packed = pack_examples(ex, max_length=lengths[0] + lengths[1])
    assert len(packed) == 2 and packed[0]["id"] == "0+1"
    row = packed[0]
    assert row["position_ids"].tolist() == list(range(lengths[0])) + list(range(lengths[1]))
    assert row["labels"][lengths[0]] == -100  # not predicted from the previous example
    assert torch.equal(row["kd_mask"], torch.cat([ex[0]["kd_mask"], ex[1]["kd_mask"]]))
    batch = collate(packed, tiny_tokenizer.pad_token_id)
    assert batch["kd_mask"].shape == batch["labels"].shape and not batch["kd_mask"][1, lengths[2] :].any()
    assert batch["position_ids"][1, lengths[2] :].tolist() == list(
        range(batch["labels"].shape[1] - lengths[2])
    )


@pytest.mark.parametrize("head", sorted(STUDENTS))
@pytest.mark.parametrize("mode", ["sft", "logits"])
def test_a_micro_batch_with_nothing_to_score_gives_every_parameter_a_zero_gradient(setting, head, mode):
    """A process whose whole micro-batch scores nothing (all labels -100) still gives every trainable
    parameter a (zero) gradient, the head's weight and bias included, as the dense path does: under FSDP2
    or DDP the processes must reduce the same parameters, or their collectives go out of step."""
    from distill.train.heads import micro_batch_loss

    b = setting["batches"][1]
    nothing = {**b, "labels": torch.full_like(b["labels"], -100)}
    student = STUDENTS[head](setting["v"])
    teacher = setting["teacher"] if mode == "logits" else None
    grads = []
    for fused in (False, True):
        student.zero_grad(set_to_none=True)
        obj = Objective(mode=mode, loss="forward_kl", alpha=0.5, n_vocab=setting["n_vocab"], fused=fused)
        total, parts = micro_batch_loss(obj, student, teacher, nothing, on_policy=False)
        assert float(total) == 0.0 and all(float(v) == 0.0 for v in parts.values())
        total.backward()
        grads.append(_grads(student))
    dense, fused_g = grads
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert fused_g.keys() == dense.keys() == trainable
    assert all(g.abs().max().item() == 0.0 for g in fused_g.values())
