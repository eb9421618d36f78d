"""Which training chunks made a small GPT-2 write what it wrote? TRAK, EK-FAC and LoGra.

A complete, offline workflow for a Hugging Face causal language model:

1. build a character-level GPT-2 from a ``GPT2Config`` (no download: the vocabulary is every
   character of the corpus plus one padding id) and train it locally, with AdamW, on
   fixed-length chunks of Python's own documentation (``pydoc_data.topics``, which ships
   with Python), long enough to memorise them (2000 steps; 300 with ``--quick``);
2. ``save_pretrained`` it to a directory and reload it with
   :func:`datatrace.hf.load_pretrained` (which never touches the network);
3. greedily generate a continuation of a few prompts with ``model.generate``: the first
   characters of two training chunks (a model that has memorised its chunks continues
   with their text) and a prompt that starts no chunk;
4. attribute the generated text to the training chunks. Each query is ``prompt +
   continuation``, right-padded into one dict batch with an ``attention_mask``; ``labels``
   are ``-100`` on the prompt and on the padding, so the target is the log-probability of
   the generated characters only (``Task(model, loss="lm", target="log_prob",
   module_types="layers")``: every ``Conv1D`` layer of the blocks, tied LM head excluded).
   A fourth, control query is a whole training chunk, which every method should rank
   first. Three methods: TRAK (projected gradients), EK-FAC influence (``if-ekfac``,
   heuristic damping, empirical Fisher) and LoGra (per-layer projected gradients, EK-FAC in
   the projected space). It prints each method's top-5 proponent chunks, the rank of the
   chunk a prompt was taken from, the per-character EK-FAC scores of that chunk
   (``attribute_per_token``: which generated characters it supports, which it opposes where
   the generation departs from it) and how much the methods agree (overlap of their top-20
   proponents, Spearman correlation of their scores).

Run ``python examples/gpt2_pydoc.py`` (about 1.5 minutes on two CPU cores) or ``--quick``
(128 chunks, 300 steps: about 15 seconds, for the test suite). Needs
``pip install "datatrace[hf]"``. On a busy machine set ``OMP_NUM_THREADS=1``: see
``examples/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from datatrace import Task, make_attributor
from datatrace.bench.settings.charlm import pydoc_corpus
from datatrace.hf import load_pretrained

FREE_PROMPT = "The return statement "  # starts no training chunk: a model of its own


@dataclass(frozen=True)
class CharTokenizer:
    """Characters <-> ids; id ``len(chars)`` is padding (and end of text for ``generate``).

    Attributes:
        chars: the vocabulary, one character per id.
    """

    chars: str

    @property
    def pad_id(self) -> int:
        return len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.chars)}
        return [index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids if i != self.pad_id)


def make_chunks(
    tok: CharTokenizer, text: str, n: int, length: int, seed: int
) -> dict[str, torch.Tensor]:
    """``n`` non-overlapping chunks of ``length`` characters, drawn at random (seeded).

    Returns:
        The training set as one dict batch (``input_ids``, ``attention_mask``, ``labels``).
    """
    ids = torch.tensor(tok.encode(text))
    n_chunks = len(ids) // length
    if n > n_chunks:
        raise SystemExit(f"--n-train {n} exceeds the {n_chunks} chunks of {length} characters.")
    chunks = ids[: n_chunks * length].view(n_chunks, length)
    pick = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed))[:n]
    rows = chunks[pick.sort().values]  # in corpus order: neighbours are related text
    return {"input_ids": rows, "attention_mask": torch.ones_like(rows), "labels": rows.clone()}


def build_model(tok: CharTokenizer, args: argparse.Namespace) -> transformers.GPT2LMHeadModel:
    """A small GPT-2 from its config (no pretrained weights), without dropout."""
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=args.chunk_len,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.pad_id,
        eos_token_id=tok.pad_id,
        pad_token_id=tok.pad_id,
    )
    return transformers.GPT2LMHeadModel(config)


def train(model: torch.nn.Module, data: dict[str, torch.Tensor], args: argparse.Namespace) -> float:
    """AdamW, linear warm-up then cosine decay, on random minibatches of chunks (seeded).

    Returns:
        The mean training loss of the last tenth of the steps (nats per character).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)

    def schedule(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / args.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(args.seed)
    n = data["input_ids"].shape[0]
    model.train()
    losses = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        out = model(input_ids=data["input_ids"][idx], labels=data["labels"][idx])
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        if step % max(1, args.steps // 5) == 0:
            recent = losses[-max(1, args.steps // 10) :]
            print(f"  step {step:4d}  train loss {sum(recent) / len(recent):.3f} nats/char")
    model.eval()
    tail = losses[-max(1, args.steps // 10) :]
    return sum(tail) / len(tail)


def generate(
    model: torch.nn.Module, tok: CharTokenizer, prompts: list[str], new_tokens: int
) -> list[str]:
    """Greedy continuations, one prompt at a time (no padding inside ``generate``)."""
    outs = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_id,
            )
        outs.append(tok.decode(gen[0, ids.shape[1] :].tolist()))
    return outs


def query_batch(
    tok: CharTokenizer, prompts: list[str], continuations: list[str]
) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + continuation`` rows; labels ``-100`` except on the continuation.

    The log-prob target sums ``log p(token t+1 | tokens <= t)`` over labelled positions, so
    only the generated characters are attributed, each conditioned on its prompt.
    """
    rows = [tok.encode(p + c) for p, c in zip(prompts, continuations)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(prompt) : len(row)] = ids[i, len(prompt) : len(row)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score vectors (no ties in practice)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def show_per_character(per_token: torch.Tensor, text: str, start: int, source: str) -> None:
    """Print a query's per-character scores for one training chunk as +/-/. marks.

    Args:
        per_token: ``(T,)`` scores of the chunk for each predicted position of the query.
        text: the query's generated characters; ``per_token[start + j]`` is character ``j``'s.
        start: position of the first generated character (the prompt's length).
        source: the chunk's own text after the prompt, for comparison.
    """
    values = per_token[start : start + len(text)]
    scale = 0.05 * float(values.abs().max())
    marks = "".join("+" if v > scale else "-" if v < -scale else "." for v in values.tolist())
    print(f"  generated  {text.replace(chr(10), '~')}")
    print(f"  per char   {marks}   (+ the chunk supports it, - opposes it; ~ is a newline)")
    print(f"  in chunk   {source[: len(text)].replace(chr(10), '~')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--n-train", type=int, default=768, help="training chunks")
    p.add_argument("--chunk-len", type=int, default=64, help="characters per chunk")
    p.add_argument("--steps", type=int, default=2000, help="AdamW steps")
    p.add_argument("--batch-size", type=int, default=32, help="chunks per step")
    p.add_argument("--lr", type=float, default=6e-3, help="peak learning rate")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32, help="characters to generate")
    p.add_argument("--proj-dim", type=int, default=1024, help="TRAK projection dimension")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="save_pretrained directory (temp)")
    p.add_argument("--quick", action="store_true", help="small sizes, for the test suite")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.steps = 128, 300
        args.proj_dim, args.new_tokens = 256, 24
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    text = pydoc_corpus()
    tok = CharTokenizer("".join(sorted(set(text))))
    train_set = make_chunks(tok, text, args.n_train, args.chunk_len, args.seed)
    n_train = args.n_train
    print(
        f"corpus: {len(text)} characters, vocabulary {tok.vocab_size}; "
        f"{n_train} training chunks of {args.chunk_len}"
    )

    # 1. train locally
    model = build_model(tok, args)
    print(f"GPT-2 with {sum(p.numel() for p in model.parameters())} parameters; training:")
    t0 = time.perf_counter()
    final_loss = train(model, train_set, args)
    print(
        f"final train loss {final_loss:.3f} nats/char (uniform: {math.log(tok.vocab_size):.3f}); "
        f"{time.perf_counter() - t0:.1f} s"
    )

    # 2. save and reload, as a user would with a model trained elsewhere
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "gpt2-pydoc"
        model.save_pretrained(out)
        (out / "vocab.json").write_text(json.dumps(tok.chars))
        model = load_pretrained(out, kind="causal-lm")
        tok = CharTokenizer(json.loads((out / "vocab.json").read_text()))
    print(f"saved and reloaded with datatrace.hf.load_pretrained ({type(model).__name__})")

    # 3. generate: two prompts taken from training chunks, one that starts none. A fourth,
    # control query is a whole training chunk: every method should rank that chunk first.
    sources = [n_train // 3, (2 * n_train) // 3]
    prompt_len = 16
    chunk_text = [tok.decode(train_set["input_ids"][i].tolist()) for i in sources]
    prompts = [t[:prompt_len] for t in chunk_text] + [FREE_PROMPT]
    continuations = generate(model, tok, prompts, args.new_tokens)
    for q, (p, c) in enumerate(zip(prompts, continuations)):
        origin = f"start of chunk {sources[q]}" if q < len(sources) else "free prompt"
        print(f"query {q} ({origin}): {p!r} -> {c!r}")
    control = len(prompts)
    print(f"query {control} (control): training chunk {sources[0]} itself, {chunk_text[0]!r}")
    queries = query_batch(tok, [*prompts, ""], [*continuations, chunk_text[0]])

    # 4. attribute the generated text to the training chunks
    task = Task(model, loss="lm", target="log_prob", module_types="layers")
    print(f"tracking {len(task.tracked_names)} parameters: the Conv1D layers of the blocks")
    methods: dict[str, dict[str, Any]] = {
        "trak": {"proj_dim": args.proj_dim},
        "if-ekfac": {"damping": "heuristic", "fisher": "empirical"},
        "logra": {"damping": "heuristic", "fisher": "empirical"},
    }
    scores = {}
    for method, kwargs in methods.items():
        t0 = time.perf_counter()
        attributor = make_attributor(method, task, **kwargs).fit(train_set)
        values = attributor.attribute(queries).values
        scores[method] = values
        print(f"\n== {method} ({time.perf_counter() - t0:.1f} s)")
        top = attributor.topk(queries, 5)
        for q in range(values.shape[0]):
            note = ""
            if q < len(sources) or q == control:
                i = sources[q] if q < len(sources) else sources[0]
                rank = 1 + int((values[q] > values[q, i]).sum())
                note = f" (source chunk {i} ranks {rank} of {n_train})"
            print(f"query {q} top-5 proponents{note}:")
            for j, v in zip(top.proponent_ids[q].tolist(), top.proponent_values[q].tolist()):
                chunk = tok.decode(train_set["input_ids"][j].tolist())
                print(f"  proponent {j:4d}  score {v:+.3e}  {chunk!r}")
        if method == "if-ekfac":
            # the score of a chunk is a sum over the query's characters: which ones does the
            # source chunk support, which does it oppose (where the generation departs from it)?
            per_token = attributor.attribute_per_token(queries)  # (n_query, T, n_train)
            for q, i in enumerate(sources):
                print(f"query {q}: per-character if-ekfac scores of its source chunk {i}")
                show_per_character(
                    per_token[q, :, i],
                    continuations[q],
                    len(prompts[q]),
                    chunk_text[q][prompt_len:],
                )

    k = 20
    print(f"\n== agreement between methods (mean over the {control} generated queries)")
    names = list(scores)
    for a, name_a in enumerate(names):
        for name_b in names[a + 1 :]:
            va, vb = scores[name_a][:control], scores[name_b][:control]
            overlap = sum(
                len(set(va[q].topk(k).indices.tolist()) & set(vb[q].topk(k).indices.tolist()))
                for q in range(control)
            ) / (k * control)
            rho = sum(spearman(va[q], vb[q]) for q in range(control)) / control
            print(
                f"agreement {name_a} vs {name_b}: top-{k} overlap {overlap:.2f}, Spearman {rho:.2f}"
            )
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
