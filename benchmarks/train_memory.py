"""Peak memory and speed of `distill train` at real vocabulary sizes: fused loss vs the plain full-logit
loss (``--no-fused``) vs TRL's ``GKDTrainer``.

Tiny-depth Llama models (2 layers; student 128 wide, teacher 192) with V = 131,072 (Mistral Tekken's size) and V = 151,936 (Qwen2.5's)
entries, a real word-level tokenizer of exactly V entries built here, batch 8 x 512 tokens (every row
full: no padding), three modes: ``logits`` against a local teacher (full distribution, alpha 1; TRL:
generalized JSD with beta 0 = forward KL, lambda 0), ``logits`` against a stored top-20 (a real store
written by `StoreWriter` from the teacher's log-probabilities; alpha 0.5) and ``sft``. Each
configuration runs in its own child process so peaks never mix.

Measured per run (CPU): the OS's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` when the
first step is about to start, read when the last step is done, before the final save), the RSS at the
start of the loop (models loaded) and the *extra* peak: peak - start - the trainable parameters'
gradients and two AdamW moments (allocated during the first step; 3 x their float32 bytes), i.e. what
the loss and activations cost beyond the model's own state. Time: seconds per optimizer step after one
warm-up step; tokens/s counts the batch's input tokens (8 x 512); CPU s/step is the process's CPU time
over the warm-up and timed steps, which other jobs on the machine disturb less than wall time.

On a CUDA GPU (``--cuda``): bf16 autocast, a 0.5B-class student (Qwen2-0.5B's shape: 24 layers, hidden
896, tied head) and a 4-layer teacher of the same width, peak = ``torch.cuda.max_memory_allocated``
(reset at the same point). That branch has not been run (no GPU was available when it was written).

TRL runs in its own venv (``.venv-bench``, see benchmarks/train.py). Command::

    .venv/bin/python benchmarks/train_memory.py [--vocab 131072 151936] [--batch-size 8] [--steps 2]
        [--modes logits-teacher logits-top20 sft] [--chunk-sweep 32,64,128,256,512]

writes ``bench-results/train_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
SEQ = 512
PROMPT = 12


# --- set-up: tokenizer of exactly V entries, models, data, a top-20 store ----------------------------


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<unk>"]
    words = {w: i for i, w in enumerate(special + [f"w{i}" for i in range(vocab - len(special))])}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    # TRL's chat collator: prompt = the user turn, completion = the assistant turn, joined by a space.
    fast.chat_template = (
        "{% for m in messages %}{% if not loop.first %} {% endif %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} {% endif %}"
    )
    assert len(fast) == vocab
    return fast


def _model(vocab: int, *, layers: int, hidden: int, seed: int, cuda: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if cuda:  # Qwen2-0.5B's shape (tied head), `layers` deep
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                          num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=SEQ * 2,
                          tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)  # fmt: skip
        return Qwen2ForCausalLM(cfg)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ * 2,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _setup(work: Path, vocab: int, n: int, cuda: bool, widths: tuple[int, int]) -> None:
    import torch

    from distill.models.base import Completion
    from distill.store import StoreWriter, completion_row
    from distill.train.vocab import vocab_hash

    tok = _tokenizer(vocab)
    student = _model(vocab, layers=24 if cuda else 2, hidden=widths[0], seed=1, cuda=cuda)
    teacher = _model(vocab, layers=4 if cuda else 2, hidden=widths[1], seed=0, cuda=cuda)
    for name, m in (("student", student), ("teacher", teacher)):
        m.save_pretrained(work / name)
        tok.save_pretrained(work / name)
    g = torch.Generator().manual_seed(0)
    # Zipf-like word ids: a few frequent words, a long tail (as text is).
    weights = 1.0 / torch.arange(1, vocab - 2, dtype=torch.float64)
    rows, completions = [], []
    for i in range(n):
        ids = (torch.multinomial(weights, SEQ - 1, replacement=True, generator=g) + 3).tolist()
        prompt = " ".join(f"w{t - 3}" for t in ids[:PROMPT])
        completion = " ".join(f"w{t - 3}" for t in ids[PROMPT:])
        rows.append({"id": str(i), "prompt": prompt, "completion": completion,
                     "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]})  # fmt: skip
        completions.append((ids[:PROMPT], ids[PROMPT:] + [tok.eos_token_id]))
    from train import write_data  # benchmarks/train.py (this script's folder is on sys.path)

    write_data(work, rows)
    # The teacher's top-20 at every completion position (temperature 1, log_softmax over all V first).
    cfg = {"teacher": {"kind": "hf", "name": "teacher"}, "tokenizer": {"name": "words", "vocab_hash": vocab_hash(tok)},
           "settings": {}, "k": 20, "capture_temperature": 1.0}  # fmt: skip
    store_rows = []
    teacher.eval()
    with torch.no_grad():
        for r, (p, c) in zip(rows, completions):
            logits = teacher(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].float()
            top = torch.log_softmax(logits, dim=-1).topk(20, dim=-1)
            comp = Completion(id=r["id"], text=r["completion"], finish_reason="stop", prompt_token_ids=p,
                              completion_token_ids=c, top_ids=top.indices.tolist(), top_logprobs=top.values.tolist())  # fmt: skip
            store_rows.append(completion_row(f"k{r['id']}", r["id"], r["prompt"], None, comp, 20))
    with StoreWriter(work / "store", cfg) as w:
        w.write(store_rows)


# --- measuring inside a worker ---------------------------------------------------------------------


class Meter:
    """Peak memory between `start` (the loop is about to begin) and `stop` (its last step is done)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.start_mib, self.peak_mib = cuda, None, None
        self.cpu_s = 0.0  # process CPU time (user + system) from start to stop: less sensitive to other load

    @staticmethod
    def _status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
        raise KeyError(key)

    def start(self) -> None:
        self.cpu_s = time.process_time()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mib = torch.cuda.memory_allocated() / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.start_mib = self._status("VmRSS")

    def stop(self) -> None:
        if self.peak_mib is not None:
            return
        self.cpu_s = time.process_time() - self.cpu_s
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mib = self._status("VmHWM")


def _trainable_mib(model) -> float:
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad) / 2**20


def _worker_distill(work: Path, a: dict) -> dict:
    import distill.train.loop as loop
    import distill.train.setup as setup
    from distill.train import train
    from distill.train.config import TrainConfig

    meter = Meter(a["cuda"])
    state = {}
    orig_prepare, orig_save, orig_load = loop.prepare_output, setup.Checkpointer.save, setup.load_models

    def prepare_output(out):  # the last thing before the loop: models loaded, data read
        orig_prepare(out)
        meter.start()

    def save(self, step, tokens):  # the final checkpoint, after the last step
        meter.stop()
        return orig_save(self, step, tokens)

    def load_models(cfg, acc):
        models = orig_load(cfg, acc)
        state["trainable_mib"] = _trainable_mib(models.student)
        return models

    loop.prepare_output, setup.Checkpointer.save, setup.load_models = prepare_output, save, load_models
    mode = a["mode"]
    data = work / ("store" if mode == "logits-top20" else "data.jsonl")
    cfg = TrainConfig(student=str(work / "student"), data=str(data), out=str(work / f"out-{a['name']}"),
                      mode="sft" if mode == "sft" else "logits", teacher=str(work / "teacher") if mode == "logits-teacher" else None,
                      alpha=1.0 if mode == "logits-teacher" else 0.5, max_steps=1 + a["steps"], batch_size=a["batch_size"],
                      max_length=SEQ, lr=1e-4, progress=False, fused=a["impl"] != "plain", chunk_size=a.get("chunk"),
                      mixed_precision="bf16" if a["cuda"] else "no")  # fmt: skip
    res = train(cfg)
    t = [h["elapsed_s"] for h in res.history]
    return {"seconds_per_step": (t[-1] - t[0]) / a["steps"], "start_mib": meter.start_mib,
            "peak_mib": meter.peak_mib, "state_mib": 3 * state["trainable_mib"],
            "cpu_s_per_step": meter.cpu_s / (1 + a["steps"])}  # fmt: skip


def _worker_trl(work: Path, a: dict) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    meter = Meter(a["cuda"])
    tok = AutoTokenizer.from_pretrained(work / "student")
    rows = [json.loads(x) for x in (work / "chat.jsonl").read_text().splitlines()]
    stamps: list[float] = []
    steps = 1 + a["steps"]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: D102
            if state.global_step == 0:
                meter.start()

        def on_step_end(self, args, state, control, **kw):  # noqa: D102
            stamps.append(time.perf_counter())
            if state.global_step == steps:
                meter.stop()

    args = GKDConfig(output_dir=str(work / "out-trl"), per_device_train_batch_size=a["batch_size"], max_steps=steps,
                     learning_rate=1e-4, lr_scheduler_type="constant", lmbda=0.0, beta=0.0, temperature=1.0,
                     max_length=SEQ, logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=not a["cuda"],
                     bf16=a["cuda"], dataloader_num_workers=0, seed=0, max_grad_norm=1.0, disable_tqdm=True)  # fmt: skip
    student = AutoModelForCausalLM.from_pretrained(work / "student")
    trainer = GKDTrainer(model=student, teacher_model=AutoModelForCausalLM.from_pretrained(work / "teacher"), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Clock()])  # fmt: skip
    trainer.train()
    return {"seconds_per_step": (stamps[-1] - stamps[0]) / a["steps"], "start_mib": meter.start_mib,
            "peak_mib": meter.peak_mib, "state_mib": 3 * _trainable_mib(student),
            "cpu_s_per_step": meter.cpu_s / (1 + a["steps"])}  # fmt: skip


def _run(python: Path, work: Path, spec: dict, threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
    cmd = [
        str(python),
        __file__,
        "--worker",
        json.dumps(spec),
        "--workdir",
        str(work),
        "--threads",
        str(threads),
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()
        return {**spec, "error": tail[-1] if tail else f"exit {done.returncode}"}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["extra_mib"] = out["peak_mib"] - out["start_mib"] - (0 if spec["cuda"] else out["state_mib"])
    out["tokens_per_s"] = spec["batch_size"] * SEQ / out["seconds_per_step"]
    return {**spec, **out, "wall_s": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[131072, 151936])
    p.add_argument("--modes", nargs="+", default=["logits-teacher", "logits-top20", "sft"])
    p.add_argument("--impls", nargs="+", default=["fused", "plain", "trl"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps (after one warm-up step)")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (1: steadier on a shared machine)"
    )
    p.add_argument("--hidden", type=int, default=128, help="student width (CPU; 2 layers)")
    p.add_argument("--teacher-hidden", type=int, default=192, help="teacher width (CPU; 2 layers)")
    p.add_argument(
        "--chunk-sweep", default="", help="also time the fused logits-teacher case at these chunk sizes"
    )
    p.add_argument("--cuda", action="store_true", help="bf16 on the GPU, a 0.5B-class student")
    p.add_argument("--out", default="bench-results/train_memory.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        spec = json.loads(a.worker)
        fn = _worker_trl if spec["impl"] == "trl" else _worker_distill
        print(json.dumps(fn(Path(a.workdir), spec)))
        return 0
    if a.cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--cuda: no CUDA GPU here")
    results = []
    for vocab in a.vocab:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            _setup(work, vocab, a.examples, a.cuda, (a.hidden, a.teacher_hidden))
            specs = []
            for mode in a.modes:
                for impl in a.impls:
                    if impl == "trl" and mode != "logits-teacher":
                        continue  # GKDTrainer distils from a local teacher only
                    specs.append({"name": f"{mode}-{impl}", "vocab": vocab, "mode": mode, "impl": impl})
            for c in [int(x) for x in a.chunk_sweep.split(",") if x]:
                specs.append(
                    {
                        "name": f"sweep-{c}",
                        "vocab": vocab,
                        "mode": "logits-teacher",
                        "impl": "fused",
                        "chunk": c,
                    }
                )
            for spec in specs:
                spec.update(batch_size=a.batch_size, steps=a.steps, cuda=a.cuda)
                if spec["impl"] == "trl" and not BENCH_PY.exists():
                    results.append({**spec, "error": f"{BENCH_PY} missing (see benchmarks/train.py)"})
                    continue
                r = _run(BENCH_PY if spec["impl"] == "trl" else Path(sys.executable), work, spec, a.threads)
                results.append(r)
                print(json.dumps(r), flush=True)
    _table(results, a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": vars(a), "load_before": os.getloadavg(), "results": results}, indent=2)
    )
    print(f"wrote {out}")
    return 0


def _table(results: list[dict], a) -> None:
    unit = "allocated" if a.cuda else "RSS"
    print(f"\n| V | batch | mode | run | peak {unit} MiB | extra MiB | plain extra / extra | s/step | CPU s/step "
          "| x plain CPU | tokens/s |")  # fmt: skip
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    plain = {
        (r["vocab"], r["batch_size"], r["mode"]): r
        for r in results
        if r.get("impl") == "plain" and "error" not in r
    }
    for r in results:
        if "error" in r:
            print(f"| {r['vocab']:,} | {r['batch_size']} | {r['mode']} | {r['name']} | - | - | - | - | - | - | "
                  f"{r['error'][:60]} |")  # fmt: skip
            continue
        base = plain.get((r["vocab"], r["batch_size"], r["mode"]))
        ratio = f"{base['extra_mib'] / r['extra_mib']:.1f}" if base and r["extra_mib"] > 0 else "-"
        slow = f"{r['cpu_s_per_step'] / base['cpu_s_per_step']:.2f}" if base else "-"
        print(f"| {r['vocab']:,} | {r['batch_size']} | {r['mode']} | {r['impl']}{'' if 'chunk' not in r else ' chunk ' + str(r['chunk'])} | "
              f"{r['peak_mib']:,.0f} | {r['extra_mib']:,.0f} | {ratio} | {r['seconds_per_step']:.2f} | "
              f"{r['cpu_s_per_step']:.2f} | {slow} | {r['tokens_per_s']:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
