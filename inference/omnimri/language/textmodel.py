"""Tokenizer and text encoder of OmniMRI's language half: training and ONNX export.

* Tokenizer: a ``tokenizers`` WordPiece model whose vocabulary is learnt here from the project's
  own corpus (:func:`inference.omnimri.language.corpus.all_text` of the *training* templates:
  instructions, questions, refusals, report sentences; :func:`train_tokenizer`); lowercasing
  BERT normaliser.
* Encoder: a tiny :class:`transformers.BertModel` configured from scratch (no hub download,
  nothing pretrained) with one linear head per label of
  :data:`inference.omnimri.language.corpus.HEADS` plus the multi-label ``tasks`` head, on the
  concatenated [CLS] and mean-pooled token states.
* Training on generated paraphrases of the training templates only (held-out templates are for
  evaluation), on one CPU thread, deterministic from the seed.
* Export: one ONNX graph ``(input_ids, attention_mask) -> logits per head``, checked against
  PyTorch on held-out phrasings.

Needs the ``train`` extra (torch, transformers); serving uses :mod:`.runtime` (ONNX Runtime).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.omnimri.language import corpus as C

OUTPUT_NAMES = ("intent", "tasks", "qtype", "target", "tissue", "side", "lobe")
"""ONNX outputs, in order: logits of each head."""
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
ENCODER_FILE = "text_encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class LanguageTrainSettings:
    """Hyper-parameters of the text encoder (defaults: the shipped model, ~1-2 min of one core)."""

    seed: int = 0
    vocab_size: int = 1200
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 128
    max_tokens: int = 64
    """Longest input in tokens (longer text is truncated)."""
    train_examples: int = 24000
    steps: int = 2500
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    decoder_steps: int = 800
    """Steps of the report decoder (:class:`~.decoder.DecoderSettings`; 0: no decoder)."""
    decoder_examples: int = 4000
    """Training reports of the report decoder."""


def train_tokenizer(max_vocab: int) -> Any:
    """A WordPiece :class:`tokenizers.Tokenizer` learnt from the training-template corpus.

    The vocabulary is the special tokens, every character seen (alone and as a ``##``
    continuation) and then every whole word, most frequent first (ties alphabetical):
    deterministic, unlike the library's WordPiece trainer (whose tie-breaking changes from run
    to run). Words outside it are split into characters; the runtime refuses a text with such
    a word (:func:`inference.omnimri.language.runtime.unknown_words`).

    Raises:
        ValueError: ``max_vocab`` cannot hold every word of the corpus.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    norm = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in C.all_text("train"):
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    vocab = list(SPECIAL) + chars + [f"##{c}" for c in chars]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    if len(vocab) + len(words) > max_vocab:  # every taught word must stay a word (runtime
        # refuses a text with a word outside the vocabulary)
        raise ValueError(f"the corpus has {len(words)} words: vocab_size {max_vocab} is "
                         f"too small (needs {len(vocab) + len(words)})")
    vocab += words
    tok = Tokenizer(models.WordPiece({t: n for n, t in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=40))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def encode_batch(tok: Any, texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int64 ``[N, T]``, padded to the longest (<= max)."""
    enc = tok.encode_batch(texts)
    n = min(max_tokens, max(len(e.ids) for e in enc))
    ids = np.zeros((len(texts), n), np.int64)
    mask = np.zeros((len(texts), n), np.int64)
    for i, e in enumerate(enc):
        k = min(n, len(e.ids))
        ids[i, :k] = e.ids[:k]
        mask[i, :k] = 1
    return ids, mask


def build_model(s: LanguageTrainSettings, vocab_size: int) -> Any:
    """The text encoder with its heads (a ``torch.nn.Module``), from scratch."""
    import torch
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers,
                     num_attention_heads=s.heads, intermediate_size=s.intermediate,
                     max_position_embeddings=max(64, s.max_tokens), type_vocab_size=1,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                     pad_token_id=0)
    cfg._attn_implementation = "eager"

    class TextEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(cfg, add_pooling_layer=False)
            width = 2 * s.hidden
            self.out = torch.nn.ModuleDict({
                "intent": torch.nn.Linear(width, len(C.INTENTS)),
                "tasks": torch.nn.Linear(width, len(C.TASKS)),
                **{h: torch.nn.Linear(width, len(C.HEADS[h])) for h in OUTPUT_NAMES[2:]},
            })

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, ...]:
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            mean = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            pooled = torch.cat([h[:, 0], mean], dim=-1)
            return tuple(self.out[n](pooled) for n in OUTPUT_NAMES)

    return TextEncoder()


def _labels(batch: list[C.Example]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {h: torch.tensor([e.label(h) for e in batch]) for h in C.HEADS}
    out["tasks"] = torch.tensor([e.tasks for e in batch], dtype=torch.float32)
    out["tasks_on"] = torch.tensor([e.intent == 0 for e in batch], dtype=torch.float32)
    return out


def _loss(logits: tuple[Any, ...], lab: dict[str, Any]) -> Any:
    import torch.nn.functional as F

    by = dict(zip(OUTPUT_NAMES, logits, strict=True))
    loss = F.cross_entropy(by["intent"], lab["intent"])
    bce = F.binary_cross_entropy_with_logits(by["tasks"], lab["tasks"], reduction="none").mean(1)
    loss = loss + (bce * lab["tasks_on"]).sum() / lab["tasks_on"].sum().clamp(min=1.0)
    for h in OUTPUT_NAMES[2:]:
        if (lab[h] != C.IGNORE).any():
            loss = loss + F.cross_entropy(by[h], lab[h], ignore_index=C.IGNORE)
    return loss


def train_language(out_folder: Path, s: LanguageTrainSettings | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train tokenizer and encoder, export both to ``out_folder`` and check ONNX vs PyTorch.

    Writes ``tokenizer.json``, ``text_encoder.onnx`` and ``language.json`` (settings, label
    names, training summary), then the neural report decoder (:mod:`.decoder`:
    ``report_tokenizer.json``, ``report_decoder.onnx``, checked against PyTorch with its
    key/value cache). Returns the ``extra.language`` spec for ``model.yaml``, with
    ``reports: decoder`` (the vision package's report decoder writes reports; ``natural``
    switches to :func:`inference.omnimri.language.narrate.narrate_results`, ``neural`` to the
    grounded neural decoder, :func:`inference.omnimri.language.reportgen.narrator_for`).
    """
    import torch

    s = s or LanguageTrainSettings()
    say = progress or (lambda m: None)
    torch.set_num_threads(1)
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    tok = train_tokenizer(s.vocab_size)
    model = build_model(s, tok.get_vocab_size())
    train = C.generate(s.train_examples, "train", seed=s.seed, noisy=True)
    ids, mask = encode_batch(tok, [e.text for e in train], s.max_tokens)
    lab = _labels(train)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(s.seed)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    lengths = mask_t.sum(1)
    batches: list[Any] = []
    model.train()
    for step in range(1, s.steps + 1):
        if not batches:  # a pool of 8 random batches, bucketed by length (less padding)
            pool = torch.randint(0, len(train), (8 * s.batch,), generator=gen)
            pool = pool[torch.argsort(lengths[pool], stable=True)]
            order = torch.randperm(8, generator=gen).tolist()
            batches = [pool[k * s.batch:(k + 1) * s.batch] for k in order]
        idx = batches.pop()
        width = int(lengths[idx].max())
        logits = model(ids_t[idx, :width], mask_t[idx, :width])
        loss = _loss(logits, {k: v[idx] for k, v in lab.items()})
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == s.steps:
            say(f"step {step}/{s.steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    train_s = time.perf_counter() - t0
    model.eval()
    out_folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_folder / TOKENIZER_FILE))
    check = export_onnx(model, tok, out_folder / ENCODER_FILE, s.max_tokens, s.seed)
    say(f"onnx vs pytorch on held-out phrasings: max |diff| {check:.2e}")
    summary = {"settings": asdict(s), "train_seconds": round(train_s, 1),
               "onnx_max_abs_diff": float(check), "vocab_size": tok.get_vocab_size(),
               "parameters": sum(p.numel() for p in model.parameters()),
               "labels": {"intent": C.INTENTS, "tasks": C.TASKS,
                          **{h: C.HEADS[h] for h in OUTPUT_NAMES[2:]}}}
    spec: dict[str, Any] = {
        "folder": out_folder.name, "tokenizer": TOKENIZER_FILE, "encoder": ENCODER_FILE,
        "max_tokens": s.max_tokens, "reports": "decoder", "seed": s.seed,
        "train_seconds": round(train_s, 1), "onnx_max_abs_diff": float(check)}
    if s.decoder_steps > 0:
        from inference.omnimri.language.decoder import DecoderSettings, train_decoder

        dec = train_decoder(out_folder, DecoderSettings(
            seed=s.seed, steps=s.decoder_steps, train_examples=s.decoder_examples), say)
        summary["report_decoder"] = {k: v for k, v in dec.items() if k != "spec"}
        spec |= dec["spec"] | {"decoder_train_seconds": dec["train_seconds"],
                               "decoder_onnx_max_abs_diff": dec["onnx_max_abs_diff"]}
    (out_folder / "language.json").write_text(json.dumps(summary, indent=1))
    return spec


def export_onnx(model: Any, tok: Any, path: Path, max_tokens: int, seed: int) -> float:
    """Write the encoder as ONNX (dynamic batch and length) and check it against PyTorch.

    Returns the largest absolute logit difference on 200 held-out phrasings (one padded
    batch, and 20 alone).

    Raises:
        RuntimeError: The difference exceeds 1e-3.
    """
    import onnxruntime as ort
    import torch

    from inference.omnimri.export import OPSET

    ex = C.generate(200, "heldout", seed=seed + 1)
    ids, mask = encode_batch(tok, [e.text for e in ex], max_tokens)
    torch.onnx.export(
        model, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), str(path),
        input_names=["input_ids", "attention_mask"], output_names=list(OUTPUT_NAMES),
        dynamic_axes={"input_ids": {0: "N", 1: "T"}, "attention_mask": {0: "N", 1: "T"},
                      **{n: {0: "N"} for n in OUTPUT_NAMES}},
        opset_version=OPSET, dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    # the whole padded batch and single texts of other lengths (the graph is traced once)
    for i, m in [(ids, mask)] + [encode_batch(tok, [e.text], max_tokens) for e in ex[:20]]:
        with torch.no_grad():
            ref = model(torch.from_numpy(i), torch.from_numpy(m))
        got = sess.run(None, {"input_ids": i, "attention_mask": m})
        diff = max(diff, *(float(np.abs(r.numpy() - g).max())
                           for r, g in zip(ref, got, strict=True)))
    if diff > 1e-3:
        raise RuntimeError(f"ONNX text encoder differs from PyTorch by {diff:.2e}")
    return diff


def write_spec(package: Path, spec: dict[str, Any]) -> None:
    """Store ``spec`` as ``extra.language`` in the package's ``model.yaml`` (other keys kept)."""
    import yaml

    p = package / "model.yaml"
    doc = yaml.safe_load(p.read_text())
    doc.setdefault("extra", {})["language"] = spec
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
