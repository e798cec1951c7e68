"""Training and ONNX export of the neural report decoder (needs the ``train`` extra: torch).

* **Tokenizer**: a ``tokenizers`` word-level model whose vocabulary is learnt here from the
  report corpus (the grammar's sentence templates with their slots, the facts-prefix tokens);
  case is kept (reports have capitals: CSF, MRI), punctuation ``.,;:()`` is split off.
* **Model**: a small :class:`transformers.GPT2LMHeadModel` configured from scratch (nothing
  downloaded or pretrained). It reads the facts prefix of
  :func:`inference.omnimri.language.reportgen.prefix_tokens` and writes the delexicalised
  findings, ``<impression>``, the impression and ``<end>``.
* **Data**: structured findings sampled by
  :func:`inference.omnimri.language.evaluate.random_facts` (a seed stream apart from the
  evaluation's), also with the tissues not segmented, each written by the grammar in one of
  :data:`~inference.omnimri.language.reportgen.STYLES` styles
  (:func:`~inference.omnimri.language.narrate.styled_choice`) - the decoder learns the
  paraphrases and when each statement is made; loss on the report tokens only.
* **Export**: the decoder *step* as one ONNX graph - ``input_ids [1, T]``, ``position_ids
  [1, T]``, ``attention_mask [1, 1, T, P+T]`` (additive), ``past [layers, 2, 1, heads, P,
  head_dim]`` (the key/value cache; P = 0 for the facts prefix) -> ``logits [1, T, vocab]``,
  ``present`` (the cache with the T new positions); checked against PyTorch's full-sequence
  logits through ONNX Runtime generation with the cache.

Deterministic from the seed on one CPU thread.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.omnimri.language import reportgen as G
from inference.omnimri.language.facts import SeriesFacts
from inference.omnimri.language.narrate import (
    ALL_TEMPLATES,
    delexicalised_report,
    slotted,
    styled_choice,
)


@dataclass
class DecoderSettings:
    """Hyper-parameters of the report decoder (defaults: the shipped one, ~2 min of a core)."""

    seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    intermediate: int = 128
    max_positions: int = 160
    """Longest prefix + report, tokens."""
    train_examples: int = 4000
    steps: int = 800
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01


def _tokenize_spec() -> Any:
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(
        Regex(r"[.,;:()]"), behavior="isolated")])


def corpus_words() -> Counter[str]:
    """Word counts of every delexicalised template (every group's slot names)."""
    pre = _tokenize_spec()
    counts: Counter[str] = Counter()
    for ts in ALL_TEMPLATES.values():
        for t in ts:
            for group in ("", "mass", "wmh"):
                counts.update(w for w, _ in pre.pre_tokenize_str(slotted(t, group)))
    return counts


def train_tokenizer() -> Any:
    """The decoder's word-level :class:`tokenizers.Tokenizer` (deterministic vocabulary).

    Special tokens, facts-prefix tokens, then the corpus words, most frequent first (ties in
    alphabetical order).
    """
    from tokenizers import Tokenizer, models

    counts = corpus_words()
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = list(G.SPECIAL) + G.all_prefix_tokens() + [w for w in words
                                                       if w not in G.SPECIAL]
    tok = Tokenizer(models.WordLevel({w: n for n, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = _tokenize_spec()
    return tok


def sample_facts(rng: random.Random) -> SeriesFacts:
    """Findings for training.

    :func:`~.evaluate.random_facts`; one in ten with the tissues segmented but no volumes
    measured, one in ten not segmented at all.
    """
    from inference.omnimri.language.evaluate import random_facts

    f = random_facts(rng)
    r = rng.random()
    if r < 0.1:
        return dataclasses.replace(f, tissue_ml={}, tasks=("segment brain tissues", *[
            t for t in f.tasks if t != "segment brain tissues"]))
    if r < 0.2:
        return dataclasses.replace(f, tissue_ml={}, tasks=tuple(
            t for t in f.tasks if t != "segment brain tissues"))
    return f


def training_sequences(tok: Any, n: int, seed: int) -> list[tuple[list[int], int]]:
    """``n`` examples: token ids (prefix + report + ``<end>``) and the prefix length."""
    rng = random.Random(f"report-decoder-{seed}")
    out = []
    for _ in range(n):
        facts = sample_facts(rng)
        style = rng.randrange(G.STYLES)
        findings, impression, _ = delexicalised_report(facts, styled_choice(style))
        prefix = G.prefix_tokens(facts, style)
        ids = [tok.token_to_id(t) for t in prefix]
        ids += tok.encode(findings, add_special_tokens=False).ids
        ids += [tok.token_to_id("<impression>")]
        ids += tok.encode(impression, add_special_tokens=False).ids + [tok.token_to_id("<end>")]
        out.append((ids, len(prefix)))
    return out


def build_model(s: DecoderSettings, vocab_size: int) -> Any:
    """The GPT-2 decoder (from scratch, eager attention: exportable)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=s.max_positions, n_embd=s.hidden,
                     n_layer=s.layers, n_head=s.heads, n_inner=s.intermediate,
                     bos_token_id=None, eos_token_id=None, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def _step_module(model: Any) -> Any:
    """The decoder step (token(s), positions, mask, cache) -> (logits, new cache)."""
    import torch
    from transformers import DynamicCache

    layers = model.config.n_layer

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    attention_mask: torch.Tensor, past: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            cache = DynamicCache()
            for n in range(layers):
                cache.update(past[n, 0], past[n, 1], n)
            out = self.m(input_ids=input_ids, position_ids=position_ids,
                         attention_mask=attention_mask, cache=cache, use_cache=True)
            new = out.cache
            present = torch.stack([torch.stack([new.layers[n].keys, new.layers[n].values])
                                   for n in range(layers)])
            return out.logits, present

    return Step().eval()


def export_onnx(model: Any, path: Path, sequences: list[list[int]]) -> float:
    """Write the decoder step as ONNX and check it against PyTorch.

    ``sequences`` (token ids): for each, the prefix is run at once and the rest token by token
    through ONNX Runtime with the cache; the logits are compared with PyTorch's on the whole
    sequence. Returns the largest absolute difference.

    Raises:
        RuntimeError: The difference exceeds 1e-3.
    """
    import onnxruntime as ort
    import torch

    from inference.omnimri.export import OPSET

    cfg = model.config
    step = _step_module(model)
    head_dim = cfg.n_embd // cfg.n_head
    ids = torch.tensor([[5, 6, 7]])
    past = torch.zeros(cfg.n_layer, 2, 1, cfg.n_head, 4, head_dim)
    mask = torch.triu(torch.full((3, 7), float("-inf")), 5)[None, None]
    with torch.no_grad():
        torch.onnx.export(
            step, (ids, torch.arange(4, 7)[None], mask, past), str(path),
            input_names=["input_ids", "position_ids", "attention_mask", "past"],
            output_names=["logits", "present"],
            dynamic_axes={"input_ids": {1: "T"}, "position_ids": {1: "T"},
                          "attention_mask": {2: "T", 3: "S"}, "past": {4: "P"},
                          "logits": {1: "T"}, "present": {4: "S"}},
            opset_version=OPSET, dynamo=False)
    model.eval()
    dec = G.ReportDecoder.__new__(G.ReportDecoder)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    dec.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    dec.empty_past = np.zeros((cfg.n_layer, 2, 1, cfg.n_head, 0, head_dim), np.float32)
    diff = 0.0
    for seq in sequences:
        n0 = min(12, len(seq) - 1)
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0].numpy()
        logits, cache = dec.step(seq[:n0], 0, dec.empty_past)
        got = [logits]
        for pos in range(n0, len(seq)):
            logits, cache = dec.step([seq[pos]], pos, cache)
            got.append(logits)
        diff = max(diff, float(np.abs(np.concatenate(got) - ref).max()))
    if diff > 1e-3:
        raise RuntimeError(f"ONNX report decoder differs from PyTorch by {diff:.2e}")
    return diff


def train_decoder(out_folder: Path, s: DecoderSettings | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the report decoder, export it to ``out_folder`` and check ONNX vs PyTorch.

    Writes ``report_tokenizer.json`` and ``report_decoder.onnx``; returns the summary
    (settings, seconds, parameters, ONNX difference) and the ``extra.language`` keys.
    """
    import torch
    import torch.nn.functional as F

    s = s or DecoderSettings()
    say = progress or (lambda m: None)
    torch.set_num_threads(1)
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    tok = train_tokenizer()
    data = training_sequences(tok, s.train_examples, s.seed)
    width = max(len(x) for x, _ in data)
    if width > s.max_positions:
        raise ValueError(f"a training report has {width} tokens > max_positions "
                         f"{s.max_positions}")
    ids = torch.zeros((len(data), width), dtype=torch.long)
    labels = torch.full((len(data), width), -100, dtype=torch.long)
    for n, (x, p) in enumerate(data):
        ids[n, :len(x)] = torch.tensor(x)
        labels[n, p:len(x)] = torch.tensor(x[p:])  # the report tokens only
    lengths = (labels != -100).sum(1) + torch.tensor([p for _, p in data])
    model = build_model(s, tok.get_vocab_size())
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(s.seed)
    model.train()
    for step in range(1, s.steps + 1):
        idx = torch.randint(0, len(data), (s.batch,), generator=gen)
        w = int(lengths[idx].max())
        logits = model(input_ids=ids[idx, :w]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[idx, 1:w].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == s.steps:
            say(f"report decoder step {step}/{s.steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    train_s = time.perf_counter() - t0
    model.eval()
    out_folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_folder / G.DECODER_TOKENIZER_FILE))
    check = export_onnx(model, out_folder / G.DECODER_FILE, [x for x, _ in data[:8]])
    say(f"report decoder onnx (kv cache) vs pytorch: max |diff| {check:.2e}")
    return {"settings": asdict(s), "train_seconds": round(train_s, 1),
            "onnx_max_abs_diff": check, "vocab_size": tok.get_vocab_size(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "spec": {"report_decoder": G.DECODER_FILE,
                     "report_tokenizer": G.DECODER_TOKENIZER_FILE}}
