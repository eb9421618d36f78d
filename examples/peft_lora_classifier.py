"""Attributing a LoRA-tuned BERT classifier, through its adapters or its merged weights.

A complete, offline workflow for a Hugging Face classifier fine-tuned with peft:

1. a synthetic text classification task: sequences of letters whose label is the letter among
   ``A``, ``B``, ``C`` that occurs most often (``"xAkBAqC"`` is ``A``); sequences have
   different lengths, so batches are padded with an ``attention_mask``. 5% of the training
   labels are deliberately flipped to a wrong class;
2. a tiny ``BertForSequenceClassification`` built from a ``BertConfig`` (no download), wrapped
   with ``peft.get_peft_model`` (LoRA on the attention ``query`` and ``value`` layers; peft
   also trains the classification head), whose adapters are trained for a few hundred AdamW
   steps;
3. attribution of test predictions with EK-FAC influence (``if-ekfac``) and TRAK, on the
   classification margin (``target="margin"``), in two ways: through the adapters
   (:func:`datatrace.hf.peft_task`: the LoRA ``A``/``B`` matrices and the head are the
   parameters) and through the merged weights (``peft_task(model, through="merged")``: the
   ``query``/``value`` weights after ``W + (α/r) B A``, and the head). It prints the top
   proponents and opponents of two test predictions;
4. a sanity check a user cares about: the self-influence of each training example
   (``attributor.self_attribute()``) should single out the flipped labels. It prints the
   AUROC of self-influence for finding them (0.5 is chance) and how many of the k flipped
   examples are among the k highest self-influences, next to the AUROC of simply ranking by training
   loss, the baseline to compare with (strong when the model cannot fit the flipped labels,
   as here; weaker once it memorises them).

Run ``python examples/peft_lora_classifier.py`` (about 10 seconds on two CPU cores) or
``--quick`` (smaller, for the test suite). Needs ``pip install "datatrace[hf]"`` and
scikit-learn.
"""

from __future__ import annotations

import argparse
import time

import peft
import torch
import torch.nn.functional as F
import transformers
from sklearn.metrics import roc_auc_score

from datatrace import make_attributor
from datatrace.hf import peft_task

PAD, CLS, SEP = 0, 1, 2
MARKERS = "ABC"  # ids 3, 4, 5: the labels
FILLERS = "defghijklmnopqrstuvwxyz"  # ids 6..
LETTERS = MARKERS + FILLERS
VOCAB = 3 + len(LETTERS)


def make_data(n: int, max_len: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` sequences of 6..max_len letters; the label is the most frequent of A, B, C.

    Each letter is a marker with probability 0.3 (one of the three at random), otherwise a
    filler; sequences whose marker counts tie for the maximum are drawn again.

    Returns:
        A dict batch: ``input_ids`` (``[CLS] letters [SEP]``, right-padded),
        ``attention_mask``, ``token_type_ids`` and ``labels``.
    """
    g = torch.Generator().manual_seed(seed)
    width = max_len + 2
    ids = torch.full((n, width), PAD)
    labels = torch.empty(n, dtype=torch.long)
    i = 0
    while i < n:
        length = int(torch.randint(6, max_len + 1, (1,), generator=g))
        is_marker = torch.rand(length, generator=g) < 0.3
        marker = torch.randint(0, len(MARKERS), (length,), generator=g)
        filler = torch.randint(len(MARKERS), len(LETTERS), (length,), generator=g)
        letters = torch.where(is_marker, marker, filler)
        counts = torch.bincount(letters[is_marker], minlength=len(MARKERS))
        if int((counts == counts.max()).sum()) > 1:
            continue  # a tie: no single most frequent marker
        ids[i, 0], ids[i, 1 : length + 1], ids[i, length + 1] = CLS, letters + 3, SEP
        labels[i] = int(counts.argmax())
        i += 1
    mask = (ids != PAD).long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": labels,
    }


def flip_labels(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of ``fraction`` of the examples, whose labels are moved to another class."""
    g = torch.Generator().manual_seed(seed + 1)
    flipped = torch.randperm(len(labels), generator=g)[: round(fraction * len(labels))]
    shift = torch.randint(1, len(MARKERS), (len(flipped),), generator=g)
    labels[flipped] = (labels[flipped] + shift) % len(MARKERS)
    return flipped


def text(ids: torch.Tensor) -> str:
    """The letters of one row of ``input_ids`` (special tokens dropped)."""
    return "".join(LETTERS[i - 3] for i in ids.tolist() if i >= 3)


def build_model(args: argparse.Namespace) -> peft.PeftModel:
    """A 2-layer BERT classifier from its config, wrapped with LoRA on query and value."""
    torch.manual_seed(args.seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * args.hidden,
        max_position_embeddings=args.max_len + 2,
        num_labels=len(MARKERS),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )
    base = transformers.BertForSequenceClassification(config)
    lora = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=["query", "value"],
    )
    return peft.get_peft_model(base, lora)


def train(model: peft.PeftModel, data: dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    """AdamW on the trainable (adapter and head) parameters, random minibatches (seeded)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    n = data["labels"].shape[0]
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        batch = {k: v[idx] for k, v in data.items()}
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 4) == 0:
            print(f"  step {step:4d}  train loss {loss.item():.3f}")
    model.eval()


def logits_of(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in data.items() if k != "labels"}).logits


def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> float:
    return float((logits_of(model, data).argmax(1) == data["labels"]).float().mean())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--n-train", type=int, default=1000, help="training sequences")
    p.add_argument("--n-test", type=int, default=200, help="test sequences")
    p.add_argument("--max-len", type=int, default=24, help="longest sequence, in letters")
    p.add_argument("--flip", type=float, default=0.05, help="fraction of flipped train labels")
    p.add_argument("--steps", type=int, default=800, help="AdamW steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--hidden", type=int, default=32, help="BERT hidden size")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--proj-dim", type=int, default=1024, help="TRAK projection dimension")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes, for the test suite")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.steps, args.proj_dim = 400, 100, 300, 512
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    train_set = make_data(args.n_train, args.max_len, args.seed)
    test_set = make_data(args.n_test, args.max_len, args.seed + 100)
    flipped = flip_labels(train_set["labels"], args.flip, args.seed)
    is_flipped = torch.zeros(args.n_train, dtype=torch.bool)
    is_flipped[flipped] = True
    print(
        f"{args.n_train} training sequences ({len(flipped)} labels flipped), "
        f"{args.n_test} test sequences; label = most frequent of A, B, C"
    )

    model = build_model(args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"BERT + LoRA: {trainable} trainable of {total} parameters; training the adapters:")
    t0 = time.perf_counter()
    train(model, train_set, args)
    print(
        f"train accuracy {accuracy(model, train_set):.3f} (on the given labels), test accuracy "
        f"{accuracy(model, test_set):.3f}; {time.perf_counter() - t0:.1f} s"
    )

    # the baseline to compare self-influence with: rank training examples by their loss
    losses = F.cross_entropy(logits_of(model, train_set), train_set["labels"], reduction="none")
    print(
        f"mislabel AUROC of the training loss (baseline): {roc_auc_score(is_flipped, losses):.3f}"
    )

    # two test predictions to explain; their labels are the true ones (margin of the truth)
    shown = [0, 1]
    queries = {k: v[shown] for k, v in test_set.items()}
    probs = F.softmax(logits_of(model, queries), 1)
    for q, i in enumerate(shown):
        pred = int(probs[q].argmax())
        print(
            f"test {i}: {text(test_set['input_ids'][i])!r}  label {MARKERS[int(queries['labels'][q])]}"
            f"  predicted {MARKERS[pred]} (p={float(probs[q, pred]):.2f})"
        )

    methods = {
        "if-ekfac": {"damping": "heuristic", "fisher": "empirical"},
        "trak": {"proj_dim": args.proj_dim},
    }
    for through in ("adapters", "merged"):
        task = peft_task(model, through=through, target="margin")
        n_params = sum(p.numel() for p in task.tracked_params().values())
        print(f"\n### through the {through}: {len(task.tracked_names)} tensors, {n_params} numbers")
        for method, kwargs in methods.items():
            t0 = time.perf_counter()
            attributor = make_attributor(method, task, **kwargs).fit(train_set)
            top = attributor.topk(queries, 3)
            self_influence = attributor.self_attribute()
            auroc = roc_auc_score(is_flipped, self_influence)
            k = max(1, len(flipped))
            caught = int(is_flipped[self_influence.topk(k).indices].sum())
            print(f"\n== {method} through {through} ({time.perf_counter() - t0:.1f} s)")
            for q, i in enumerate(shown):
                for kind, ids, vals in (
                    ("proponent", top.proponent_ids[q], top.proponent_values[q]),
                    ("opponent", top.opponent_ids[q], top.opponent_values[q]),
                ):
                    for j, v in zip(ids.tolist(), vals.tolist()):
                        label = MARKERS[int(train_set["labels"][j])]
                        mark = "  FLIPPED" if is_flipped[j] else ""
                        print(
                            f"  test {i} {kind:9s} {j:4d}  score {v:+.3e}  label {label}  "
                            f"{text(train_set['input_ids'][j])!r}{mark}"
                        )
            print(
                f"mislabel AUROC {method} {through}: {auroc:.3f}  "
                f"(flipped among the top {k} by self-influence: {caught})"
            )
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
